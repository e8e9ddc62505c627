"""Base-checkpoint loaders: Hugging Face folders (golden ViT from scripts/make_golden.py) and
big_vision .npz files (a random augreg-named tree, checked against a numpy forward)."""

from __future__ import annotations

import json
import math
import os
import shutil

import golden_files
import jax
import numpy as np
import pytest
from golden_files import rel_err
from safetensors.numpy import load_file, save_file

from jaxmerge.models import vit

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
HF = os.path.join(GOLDEN, "hf_vit")
# transformers 5.x in-memory names for the Hub (4.x) names of a block's modules.
V5_NAMES = {
    "encoder.layer.": "layers.",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def golden(key: str) -> np.ndarray:
    return golden_files.arrays()[key]


def write_hf(folder, state: dict, config_changes: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(HF, "config.json")) as f:
        config = json.load(f)
    config.update(config_changes or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return str(folder)


def hf_state() -> dict[str, np.ndarray]:
    return load_file(os.path.join(HF, "model.safetensors"))


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_vit_kwargs():
    vit_kwargs, params, head = vit.load_hf(HF)
    assert vit_kwargs == dict(
        width=32,
        depth=2,
        mlp_dim=64,
        num_heads=2,
        patch_size=4,
        image_size=16,
        channels=3,
        pool="cls",
        pooler=True,
        layer_norm_eps=1e-12,
        gelu_approximate=False,
    )
    assert head is None
    assert params["patch_embed"]["kernel"].shape == (4 * 4 * 3, 32)


def test_hf_patch_embedding_order():
    """kernel[(row * p + col) * C + channel, d] = conv weight[d, channel, row, col]."""
    _, params, _ = vit.load_hf(HF)
    conv = hf_state()["embeddings.patch_embeddings.projection.weight"]
    kernel = np.asarray(params["patch_embed"]["kernel"])
    row, col, channel, d = 3, 1, 2, 5
    assert kernel[(row * 4 + col) * 3 + channel, d] == conv[d, channel, row, col]


def test_hf_classification_checkpoint(tmp_path):
    """A ViTForImageClassification: `vit.` prefix, no pooler, a classifier as the head."""
    state = {f"vit.{k}": v for k, v in hf_state().items() if not k.startswith("pooler")}
    rng = np.random.default_rng(0)
    state["classifier.weight"] = rng.normal(size=(5, 32)).astype(np.float32)
    state["classifier.bias"] = rng.normal(size=(5,)).astype(np.float32)
    folder = write_hf(tmp_path, state, {"architectures": ["ViTForImageClassification"]})
    vit_kwargs, params, head = vit.load_hf(folder)
    assert not vit_kwargs["pooler"] and "pooler" not in params
    np.testing.assert_array_equal(head["out"]["kernel"], state["classifier.weight"].T)
    np.testing.assert_array_equal(head["out"]["bias"], state["classifier.bias"])
    out = vit.ViT(**vit_kwargs).apply({"params": params}, golden("images"))
    assert rel_err(out["tokens"], golden("base/last_hidden_state")) < 1e-4
    np.testing.assert_array_equal(out["pooled"], out["tokens"][:, 0])


def test_hf_transformers5_names_load_the_same(tmp_path):
    state = {}
    for name, value in hf_state().items():
        for old, new in V5_NAMES.items():
            name = name.replace(old, new)
        state[name] = value
    assert "layers.0.mlp.fc2.weight" in state
    _, want, _ = vit.load_hf(HF)
    _, got, _ = vit.load_hf(write_hf(tmp_path, state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_hf_without_qkv_bias(tmp_path):
    state = {k: v for k, v in hf_state().items() if not re_qkv_bias(k)}
    folder = write_hf(tmp_path, state, {"qkv_bias": False})
    _, params, _ = vit.load_hf(folder)
    assert not np.any(params["block_1"]["attention"]["key"]["bias"])


def re_qkv_bias(name: str) -> bool:
    return name.endswith(("query.bias", "key.bias", "value.bias"))


def test_hf_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        vit.load_hf(str(tmp_path))
    shutil.copy(os.path.join(HF, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="model.safetensors"):
        vit.load_hf(str(tmp_path))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"architectures": ["ViTMAEModel"]}, "unknown architecture.*ViTMAEModel"),
        ({"model_type": "deit"}, "model_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"intermediate_size": 128}, "block_0/mlp/fc1/bias.*intermediate.dense.bias.*shape"),
        ({"patch_size": [4, 2]}, "patch_size"),
    ],
)
def test_hf_bad_config(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        vit.load_hf(write_hf(tmp_path, hf_state(), changes))


def test_hf_bad_tensors(tmp_path):
    state = hf_state()
    state["embeddings.position_embeddings"] = np.zeros((1, 5, 32), np.float32)
    with pytest.raises(ValueError, match="pos_embedding.*embeddings.position_embeddings.*shape"):
        vit.load_hf(write_hf(tmp_path / "shape", state))
    state = hf_state()
    state["decoder.conv.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="decoder.conv.weight"):
        vit.load_hf(write_hf(tmp_path / "extra", state))
    state = hf_state()
    del state["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match="block_1/mlp/fc2/bias.*missing"):
        vit.load_hf(write_hf(tmp_path / "missing", state))


# ----------------------------------------------------------------------------- big_vision

WIDTH, HEADS, MLP, PATCH, CHANNELS, GRID, DEPTH, CLASSES = 16, 2, 24, 4, 3, 3, 2, 5


def augreg_tree(seed: int = 0) -> dict[str, np.ndarray]:
    """A random vision_transformer (augreg) checkpoint with a pre_logits layer and a head."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    hd = WIDTH // HEADS
    flat = {
        "embedding/kernel": normal(PATCH, PATCH, CHANNELS, WIDTH),
        "embedding/bias": normal(WIDTH),
        "cls": normal(1, 1, WIDTH),
        "Transformer/posembed_input/pos_embedding": normal(1, 1 + GRID * GRID, WIDTH),
        "Transformer/encoder_norm/scale": 1 + normal(WIDTH),
        "Transformer/encoder_norm/bias": normal(WIDTH),
        "pre_logits/kernel": normal(WIDTH, WIDTH),
        "pre_logits/bias": normal(WIDTH),
        "head/kernel": normal(WIDTH, CLASSES),
        "head/bias": normal(CLASSES),
    }
    for i in range(DEPTH):
        block = f"Transformer/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            flat[f"{block}/{norm}/scale"] = 1 + normal(WIDTH)
            flat[f"{block}/{norm}/bias"] = normal(WIDTH)
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for name in ("query", "key", "value"):
            flat[f"{attention}/{name}/kernel"] = normal(WIDTH, HEADS, hd)
            flat[f"{attention}/{name}/bias"] = normal(HEADS, hd)
        flat[f"{attention}/out/kernel"] = normal(HEADS, hd, WIDTH)
        flat[f"{attention}/out/bias"] = normal(WIDTH)
        flat[f"{block}/MlpBlock_3/Dense_0/kernel"] = normal(WIDTH, MLP)
        flat[f"{block}/MlpBlock_3/Dense_0/bias"] = normal(MLP)
        flat[f"{block}/MlpBlock_3/Dense_1/kernel"] = normal(MLP, WIDTH)
        flat[f"{block}/MlpBlock_3/Dense_1/bias"] = normal(WIDTH)
    return flat


def numpy_forward(flat: dict[str, np.ndarray], images: np.ndarray) -> dict[str, np.ndarray]:
    """The augreg ViT written out in float64 numpy, straight from the checkpoint's names."""
    f = {k: v.astype(np.float64) for k, v in flat.items()}
    images = images.astype(np.float64)

    def norm(x, prefix):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * f[f"{prefix}/scale"] + f[f"{prefix}/bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    batch, size = images.shape[:2]
    n = size // PATCH
    # Stride-PATCH convolution with the (p, p, C, D) kernel.
    x = np.zeros((batch, n, n, WIDTH))
    for i in range(n):
        for j in range(n):
            window = images[:, i * PATCH : (i + 1) * PATCH, j * PATCH : (j + 1) * PATCH]
            x[:, i, j] = np.einsum("bpqc,pqcd->bd", window, f["embedding/kernel"])
    x = x.reshape(batch, n * n, WIDTH) + f["embedding/bias"]
    x = np.concatenate([np.repeat(f["cls"], batch, 0), x], 1)
    x = x + f["Transformer/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        block = f"Transformer/encoderblock_{i}"
        mha = f"{block}/MultiHeadDotProductAttention_1"
        y = norm(x, f"{block}/LayerNorm_0")
        q, k, v = (
            np.einsum("btd,dhk->bthk", y, f[f"{mha}/{m}/kernel"]) + f[f"{mha}/{m}/bias"]
            for m in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("bhqt,bthk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", context, f[f"{mha}/out/kernel"]) + f[f"{mha}/out/bias"]
        y = norm(x, f"{block}/LayerNorm_2")
        mlp = f"{block}/MlpBlock_3"
        h = gelu_tanh(y @ f[f"{mlp}/Dense_0/kernel"] + f[f"{mlp}/Dense_0/bias"])
        x = x + h @ f[f"{mlp}/Dense_1/kernel"] + f[f"{mlp}/Dense_1/bias"]
    tokens = norm(x, "Transformer/encoder_norm")
    pooled = np.tanh(tokens[:, 0] @ f["pre_logits/kernel"] + f["pre_logits/bias"])
    return {
        "tokens": tokens,
        "pooled": pooled,
        "logits": pooled @ f["head/kernel"] + f["head/bias"],
    }


def write_npz(tmp_path, flat, name="vit.npz") -> str:
    path = str(tmp_path / name)
    np.savez(path, **flat)
    return path


def test_bigvision_matches_numpy_forward(tmp_path):
    flat = augreg_tree()
    vit_kwargs, params, head = vit.load_bigvision(write_npz(tmp_path, flat))
    assert vit_kwargs["image_size"] == GRID * PATCH and vit_kwargs["gelu_approximate"]
    assert vit_kwargs["layer_norm_eps"] == 1e-6 and vit_kwargs["pooler"]
    images = np.random.default_rng(1).normal(size=(2, 12, 12, 3)).astype(np.float32)
    out = vit.ViT(**vit_kwargs).apply({"params": params}, images)
    want = numpy_forward(flat, images)
    assert rel_err(out["tokens"], want["tokens"]) < 1e-4
    assert rel_err(out["pooled"], want["pooled"]) < 1e-4
    logits = out["pooled"] @ head["out"]["kernel"] + head["out"]["bias"]
    assert rel_err(logits, want["logits"]) < 1e-4


def test_bigvision_scanned_and_prefixed_layout(tmp_path):
    """big_vision's own layout: `params/` prefix, stacked `encoderblock`, modules numbered
    MultiHeadDotProductAttention_0, LayerNorm_0/1, MlpBlock_0."""
    flat = augreg_tree()
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0"}
    renames.update({"LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"})
    scanned: dict[str, list] = {}
    other = {}
    for key, value in flat.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        if key.startswith("Transformer/encoderblock_"):
            rest = key.split("/", 2)[2]
            scanned.setdefault(f"Transformer/encoderblock/{rest}", []).append(value)
        else:
            other[key] = value
    layout = {f"params/{k}": v for k, v in other.items()}
    layout.update({f"params/{k}": np.stack(v) for k, v in scanned.items()})
    _, want, _ = vit.load_bigvision(write_npz(tmp_path, flat, "augreg.npz"))
    _, got, _ = vit.load_bigvision(write_npz(tmp_path, layout, "bv.npz"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_bigvision_resamples_position_embeddings(tmp_path):
    flat = augreg_tree()
    vit_kwargs, params, _ = vit.load_bigvision(write_npz(tmp_path, flat), image_size=20)
    assert vit_kwargs["image_size"] == 20
    pos = flat["Transformer/posembed_input/pos_embedding"]
    want = vit.resample_pos_embedding(pos, 25, has_cls=True)
    np.testing.assert_allclose(params["pos_embedding"], want, rtol=1e-6)
    np.testing.assert_array_equal(params["pos_embedding"][:, 0], pos[:, 0])
    out = vit.ViT(**vit_kwargs).apply({"params": params}, np.zeros((1, 20, 20, 3), np.float32))
    assert out["tokens"].shape == (1, 26, WIDTH)


def test_bigvision_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.npz"):
        vit.load_bigvision(str(tmp_path / "missing.npz"))
    flat = augreg_tree()
    path = write_npz(tmp_path, flat)
    with pytest.raises(ValueError, match="image_size=18"):
        vit.load_bigvision(path, image_size=18)
    broken = dict(flat)
    del broken["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(ValueError, match="encoderblock_1/MlpBlock_3/Dense_1/bias"):
        vit.load_bigvision(write_npz(tmp_path, broken, "broken.npz"))
    broken = dict(flat)
    broken["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"] = np.zeros((25, WIDTH))
    with pytest.raises(ValueError, match="block_0/mlp/fc2/kernel.*shape"):
        vit.load_bigvision(write_npz(tmp_path, broken, "shape.npz"))
