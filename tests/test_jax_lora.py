"""Adapters of other JAX LoRA libraries: qwix (with the real package when installed) and lorax
(on its documented layout; the package needs jax < 0.5), folded into the base, give the
library's own forward; names that do not map fail in one line."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxmerge import lora
from jaxmerge.interop import jax_lora
from jaxmerge.models import vit

WIDTH, MLP, HEADS = 8, 16, 2
ATTENTION = ("query", "key", "value", "out")


class Attention(nn.Module):
    """Plain flax Dense layers under jaxmerge's ViT names (every one on the path)."""

    @nn.compact
    def __call__(self, x):
        dense = {n: nn.Dense(WIDTH, name=n) for n in ATTENTION}
        return dense["out"](dense["query"](x) + dense["key"](x) + dense["value"](x))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH, name="fc2")(nn.gelu(nn.Dense(MLP, name="fc1")(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Mlp(name="mlp")(Attention(name="attention")(x))


class Encoder(nn.Module):
    """block_0 and block_1, as jaxmerge's ViT names its blocks."""

    @nn.compact
    def __call__(self, x):
        return Block(name="block_1")(Block(name="block_0")(x))


def _without_lora(params):
    """The base params of a qwix model: every `*_lora_a` / `*_lora_b` entry dropped."""
    if not isinstance(params, dict):
        return params
    return {k: _without_lora(v) for k, v in params.items() if "_lora_" not in k}


def _randomize(tree, key, match):
    """Small random values for the leaves whose key path contains `match` (LoRA B starts
    at 0, and an update of zero would prove nothing)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(leaves))
    new = [
        0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        if match in jax.tree_util.keystr(path)
        else leaf
        for (path, leaf), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def _inputs():
    return jax.random.normal(jax.random.key(9), (3, 5, WIDTH))


# ----------------------------------------------------------------------------- qwix


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_qwix_adapter_folded_gives_qwix_forward():
    qwix = pytest.importorskip("qwix")
    provider = qwix.LoraProvider(
        module_path=r".*(attention/(query|key|value|out)|mlp/fc[12])", rank=2, alpha=3.0
    )
    model = qwix.apply_lora_to_model(Encoder(), provider)
    x = _inputs()
    params = model.init(jax.random.key(0), x)["params"]
    params = _randomize(params, jax.random.key(1), "_lora_b")
    expected = model.apply({"params": params}, x)

    # The same layer shapes in jaxmerge's ViT: the adapter is checked against its base.
    vit_kwargs = vit.variant("mu/4", width=WIDTH, mlp_dim=MLP, depth=2, num_heads=HEADS)
    vit_base = vit.init_params(vit.ViT(**vit_kwargs, image_size=8), jax.random.key(2))
    adapter = jax_lora.from_qwix(params, alpha=3.0, rank=2, base=vit_base)
    base = _without_lora(params)
    assert lora.ranks(adapter) == {
        f"block_{i}/{p}": 2
        for i in (0, 1)
        for p in [*(f"attention/{n}" for n in ATTENTION), "mlp/fc1", "mlp/fc2"]
    }
    assert float(adapter["block_0"]["mlp"]["fc1"]["scale"]) == 1.5  # alpha / rank
    folded = lora.fold_into_base(base, adapter)
    np.testing.assert_allclose(Encoder().apply({"params": folded}, x), expected, atol=1e-5)
    assert np.abs(Encoder().apply({"params": base}, x) - expected).max() > 1e-2


class BigVisionAttention(nn.Module):
    """big_vision's per-head kernels: query (D, H, hd), out (H, hd, D), under its names."""

    @nn.compact
    def __call__(self, x):
        heads = (HEADS, WIDTH // HEADS)
        q = nn.DenseGeneral(heads, name="query")(x)
        return nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(q)


class BigVision(nn.Module):
    """Scopes Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{query,out}."""

    @nn.compact
    def __call__(self, x):
        return BigVisionTransformer(name="Transformer")(x)


class BigVisionTransformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return BigVisionBlock(name="encoderblock_0")(x)


class BigVisionBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return BigVisionAttention(name="MultiHeadDotProductAttention_1")(x)


def test_qwix_multi_axis_kernels_flatten_like_the_base():
    qwix = pytest.importorskip("qwix")
    provider = qwix.LoraProvider(module_path=r".*/(query|out)", rank=2, alpha=4.0)
    model = qwix.apply_lora_to_model(BigVision(), provider)
    x = _inputs()
    params = model.init(jax.random.key(0), x)["params"]
    params = _randomize(params, jax.random.key(1), "_lora_b")
    expected = model.apply({"params": params}, x)

    adapter = jax_lora.from_qwix(params, alpha=4.0)
    query = adapter["block_0"]["attention"]["query"]
    assert query["lora_a"].shape == (WIDTH, 2) and query["lora_b"].shape == (2, WIDTH)
    base = _without_lora(params)
    layers = base["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    updated = {}
    for name in ("query", "out"):  # jaxmerge's 2-D delta, reshaped back to big_vision's kernel
        kernel = layers[name]["kernel"]
        delta = lora.delta_of(adapter["block_0"]["attention"][name]).reshape(kernel.shape)
        updated[name] = {**layers[name], "kernel": kernel + delta}
    folded = {"Transformer": {"encoderblock_0": {"MultiHeadDotProductAttention_1": updated}}}
    np.testing.assert_allclose(BigVision().apply({"params": folded}, x), expected, atol=1e-5)
    assert np.abs(BigVision().apply({"params": base}, x) - expected).max() > 1e-2


def _qwix_layout(rank=2):
    """qwix's documented layout, built by hand: factors beside each adapted kernel."""
    rng = np.random.default_rng(0)
    layer = lambda n_in, n_out: {  # noqa: E731
        "kernel": rng.normal(size=(n_in, n_out)).astype(np.float32),
        "bias": np.zeros(n_out, np.float32),
        "kernel_lora_a": rng.normal(size=(n_in, rank)).astype(np.float32),
        "kernel_lora_b": rng.normal(size=(rank, n_out)).astype(np.float32),
    }
    return {
        "block_0": {"attention": {"query": layer(WIDTH, WIDTH)}, "mlp": {"fc1": layer(WIDTH, MLP)}}
    }


def test_qwix_documented_layout():
    params = _qwix_layout()
    adapter = jax_lora.from_qwix(params, alpha={r".*attention.*": 6.0, r".*": 1.0})
    for path, alpha in (("block_0/attention/query", 6.0), ("block_0/mlp/fc1", 1.0)):
        layer, node = lora.get_at(params, path), lora.get_at(adapter, path)
        np.testing.assert_array_equal(node["lora_a"], layer["kernel_lora_a"])
        np.testing.assert_array_equal(node["lora_b"], layer["kernel_lora_b"])
        assert float(node["scale"]) == alpha / 2
        # qwix: y = x @ kernel + (x @ lora_a @ lora_b) * alpha / rank
        x = np.ones((1, layer["kernel"].shape[0]), np.float32)
        qwix_y = x @ layer["kernel"] + (x @ layer["kernel_lora_a"] @ layer["kernel_lora_b"]) * (
            alpha / 2
        )
        np.testing.assert_allclose(x @ (layer["kernel"] + lora.delta_of(node)), qwix_y, rtol=1e-5)


# ----------------------------------------------------------------------------- lorax


@dataclasses.dataclass
class LoraWeight:
    """lorax.LoraWeight's fields (lorax/transform.py of jax-lorax 0.3.1): w (M, N), a (k, N),
    b (M, k), alpha; `materialize() = w + alpha / k * b @ a`."""

    w: np.ndarray
    a: np.ndarray
    b: np.ndarray
    alpha: float = 1.0

    def materialize(self):
        return self.w + self.alpha / self.b.shape[-1] * self.b @ self.a


def _lorax_layout(rank=3):
    rng = np.random.default_rng(1)
    weight = lambda n_in, n_out: LoraWeight(  # noqa: E731
        rng.normal(size=(n_in, n_out)).astype(np.float32),
        rng.normal(size=(rank, n_out)).astype(np.float32),
        rng.normal(size=(n_in, rank)).astype(np.float32),
        alpha=5.0,
    )
    return {
        "vit": {
            "block_0": {
                "attention": {"value": {"kernel": weight(WIDTH, WIDTH), "bias": np.zeros(WIDTH)}},
                "mlp": {"fc2": {"kernel": weight(MLP, WIDTH), "bias": np.zeros(WIDTH)}},
            }
        }
    }


@pytest.mark.parametrize("as_dict", [False, True])
def test_lorax_documented_layout(as_dict):
    params = _lorax_layout()
    if as_dict:  # a LoraWeight saved as a dict of its fields
        params = jax.tree.map(
            lambda x: dataclasses.asdict(x) if isinstance(x, LoraWeight) else x,
            params,
            is_leaf=lambda x: isinstance(x, LoraWeight),
        )
    adapter = jax_lora.from_lorax(params)
    for path in ("block_0/attention/value", "block_0/mlp/fc2"):
        weight = lora.get_at(_lorax_layout(), f"vit/{path}")["kernel"]
        node = lora.get_at(adapter, path)
        np.testing.assert_array_equal(node["lora_a"], weight.b)  # lorax's b is (in, r)
        np.testing.assert_array_equal(node["lora_b"], weight.a)
        assert node["scale"] == np.float32(5.0 / 3)
        np.testing.assert_allclose(weight.w + lora.delta_of(node), weight.materialize(), rtol=1e-5)


def test_lorax_adapter_folded_gives_lorax_forward():
    lorax = pytest.importorskip("lorax")
    if not hasattr(lorax, "LoraWeight"):
        pytest.skip("the installed 'lorax' is not davisyoshida's (PyPI jax-lorax)")
    model, x = Encoder(), _inputs()
    base = model.init(jax.random.key(0), x)["params"]
    is_target = lambda path, arr: (  # noqa: E731
        2 if arr.ndim == 2 and "kernel" in jax.tree_util.keystr(path) else lorax.LORA_FREEZE
    )
    spec = lorax.simple_spec(base, decision_fn=is_target)
    params = lorax.init_lora(base, spec, jax.random.key(1), alpha=3.0)
    is_weight = lambda v: isinstance(v, lorax.LoraWeight)  # noqa: E731
    params = jax.tree.map(  # lorax starts b at 0: give it values
        lambda v: lorax.LoraWeight(v.w, v.a, 1.0 + 0 * v.b, v.alpha) if is_weight(v) else v,
        params,
        is_leaf=is_weight,
    )
    expected = lorax.lora(model.apply)({"params": params}, x)
    folded = lora.fold_into_base(base, jax_lora.from_lorax(params))
    np.testing.assert_allclose(model.apply({"params": folded}, x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(model.apply({"params": base}, x) - expected).max() > 1e-2


# ----------------------------------------------------------------------------- paths, errors


@pytest.mark.parametrize(
    "path, target",
    [
        ("block_3/attention/query", "block_3/attention/query"),
        ("encoder/block_0/mlp/fc2", "block_0/mlp/fc2"),
        ("Transformer/encoderblock_2/MultiHeadDotProductAttention_1/out", "block_2/attention/out"),
        ("img/Transformer/encoderblock_0/MlpBlock_3/Dense_0", "block_0/mlp/fc1"),
        ("vit/encoder/layer/4/attention/attention/value", "block_4/attention/value"),
        ("vit/encoder/layer/4/attention/output/dense", "block_4/attention/out"),
        ("vit/encoder/layer/1/output/dense", "block_1/mlp/fc2"),
        ("vit/pooler/dense", "pooler"),
    ],
)
def test_path_map_table(path, target):
    assert jax_lora.target_path(path, jax_lora.PATH_MAP, "qwix") == target


def test_path_map_argument_renames_layers():
    params = {"layers_0": {"q_proj": _qwix_layout()["block_0"]["attention"]["query"]}}
    path_map = {r"layers_(\d+)/q_proj": r"block_\1/attention/query"}
    adapter = jax_lora.from_qwix(params, alpha=2.0, path_map=path_map)
    assert lora.ranks(adapter) == {"block_0/attention/query": 2}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_name_the_layer_and_what_is_allowed():
    layer = _qwix_layout()["block_0"]["attention"]["query"]
    message = _error(jax_lora.from_qwix, {"decoder": {"q": layer}}, alpha=1.0)
    assert "layer 'decoder/q' maps to no jaxmerge target" in message and "path_map=" in message
    message = _error(jax_lora.from_qwix, {"block_0": {"norm1": layer}}, alpha=1.0)
    assert "no jaxmerge target" in message
    bad_map = {r"(.*)": "block_0/norm1"}
    message = _error(jax_lora.from_qwix, {"q": layer}, alpha=1.0, path_map=bad_map)
    assert "maps to 'block_0/norm1', which is not a LoRA target; allowed: block_N/" in message
    half = {k: v for k, v in layer.items() if k != "kernel_lora_b"}
    assert "has no kernel_lora_b" in _error(
        jax_lora.from_qwix, {"block_0": {"mlp": {"fc1": half}}}, alpha=1.0
    )
    message = _error(jax_lora.from_qwix, _qwix_layout(rank=2), alpha=1.0, rank=4)
    assert "allowed: (..., r) and (r, ...) with r = rank 4" in message
    assert "no `<weight>_lora_a`" in _error(jax_lora.from_qwix, {"a": {"kernel": 1}}, alpha=1.0)
    message = _error(jax_lora.from_qwix, _qwix_layout(), alpha={r".*mlp.*": 1.0})
    assert "layer 'block_0/attention/query': no regex of alpha=" in message
    twice = {
        "block_0": {"attention": {"query": layer}},
        "x": {"block_0": {"attention": {"query": layer}}},
    }
    assert "both map to 'block_0/attention/query'" in _error(jax_lora.from_qwix, twice, alpha=1.0)

    conv = LoraWeight(np.zeros((3, 3, 4, 8)), np.zeros((1, 1, 2, 8)), np.zeros((3, 3, 4, 2)))
    message = _error(jax_lora.from_lorax, {"block_0": {"mlp": {"fc1": {"kernel": conv}}}})
    assert "layer 'block_0/mlp/fc1': a (1, 1, 2, 8)" in message and "allowed: a dense" in message
    no_alpha = {
        "block_0": {"mlp": {"fc1": {"kernel": {"a": np.zeros((2, 8)), "b": np.zeros((4, 2))}}}}
    }
    assert "has no alpha" in _error(jax_lora.from_lorax, no_alpha)
    assert jax_lora.from_lorax(no_alpha, alpha=2.0)["block_0"]["mlp"]["fc1"]["scale"] == 1.0


def test_base_is_checked_when_given():
    params = _qwix_layout()
    base = {"block_0": {"attention": {"query": {"kernel": np.zeros((WIDTH, WIDTH))}}}}
    message = _error(jax_lora.from_qwix, params, alpha=1.0, base=base)
    assert "qwix adapter target 'block_0/mlp/fc1' is not a layer of the base" in message
