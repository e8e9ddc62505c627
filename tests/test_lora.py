"""Invariants of the ViT + LoRA core: no-op init, fold/unfold, jit vs eager, closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmerge import lora
from jaxmerge.models import layers, vit

MODEL = vit.ViT(**vit.variant("mu/4", image_size=16, depth=2, pooler=True))
BASE = vit.init_params(MODEL, jax.random.key(0))
IMAGES = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))


def randomised(adapter, key, std=0.1):
    """The adapter with nonzero lora_b, so its update is not zero."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + std * jax.random.normal(k, x.shape) if x.ndim else x for x, k in zip(leaves, keys)],
    )


def forward(params, adapter=None):
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    return MODEL.apply(variables, IMAGES)


@pytest.mark.parametrize("targets", sorted(vit.TARGET_PRESETS))
def test_fresh_adapter_changes_nothing(targets):
    adapter = lora.init_adapter(
        jax.random.key(2), BASE, lora.LoraConfig(rank=4, targets=vit.TARGET_PRESETS[targets])
    )
    plain, adapted = forward(BASE), forward(BASE, adapter)
    np.testing.assert_array_equal(plain["tokens"], adapted["tokens"])
    np.testing.assert_array_equal(plain["pooled"], adapted["pooled"])


def test_zeroed_adapter_changes_nothing():
    adapter = randomised(
        lora.init_adapter(
            jax.random.key(2), BASE, lora.LoraConfig(targets=vit.TARGET_PRESETS["all"])
        ),
        jax.random.key(3),
    )
    np.testing.assert_array_equal(
        forward(BASE)["pooled"], forward(BASE, lora.zeros_like_adapter(adapter))["pooled"]
    )


def test_adapter_changes_output_and_factored_equals_dense_and_folded():
    config = lora.LoraConfig(rank=4, alpha=16, targets=vit.TARGET_PRESETS["all"])
    adapter = randomised(lora.init_adapter(jax.random.key(2), BASE, config), jax.random.key(3))
    factored = forward(BASE, adapter)["tokens"]
    assert np.abs(factored - forward(BASE)["tokens"]).max() > 1e-2
    dense = forward(BASE, lora.delta_weights(adapter))["tokens"]
    folded = forward(lora.fold_into_base(BASE, adapter))["tokens"]
    np.testing.assert_allclose(dense, factored, atol=2e-5)
    np.testing.assert_allclose(folded, factored, atol=2e-5)


def test_fold_then_unfold_returns_base_and_base_is_not_mutated():
    adapter = randomised(
        lora.init_adapter(
            jax.random.key(2), BASE, lora.LoraConfig(targets=vit.TARGET_PRESETS["all"])
        ),
        jax.random.key(3),
    )
    before = jax.tree.map(np.array, BASE)
    folded = lora.fold_into_base(BASE, adapter)
    restored = lora.unfold_from_base(folded, adapter)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, before)
    jax.tree.map(np.testing.assert_array_equal, BASE, before)
    changed = (
        folded["block_0"]["attention"]["query"]["kernel"]
        - BASE["block_0"]["attention"]["query"]["kernel"]
    )
    assert np.abs(changed).max() > 0


def test_delta_closed_form_and_scaling():
    config = lora.LoraConfig(
        rank=4,
        alpha=6,
        targets=vit.TARGET_PRESETS["qv"],
        rank_pattern={"block_1": 2},
        alpha_pattern={"value": 3},
    )
    adapter = randomised(lora.init_adapter(jax.random.key(2), BASE, config), jax.random.key(3))
    node = adapter["block_1"]["attention"]["query"]
    assert node["lora_a"].shape == (32, 2) and float(node["scale"]) == pytest.approx(6 / 2)
    assert float(adapter["block_0"]["attention"]["value"]["scale"]) == pytest.approx(3 / 4)
    expected = 3.0 * np.asarray(node["lora_a"], np.float64) @ np.asarray(node["lora_b"], np.float64)
    np.testing.assert_allclose(
        lora.delta_weights(adapter)["block_1"]["attention"]["query"]["delta"],
        expected,
        rtol=1e-5,
        atol=1e-6,
    )
    rs = lora.LoraConfig(rank=4, alpha=8, use_rslora=True)
    assert rs.scale_for("block_0/attention/query") == pytest.approx(8 / 2)


def test_peft_initialisation():
    config = lora.LoraConfig(rank=16, targets=vit.TARGET_PRESETS["qv"])
    adapter = lora.init_adapter(jax.random.key(5), BASE, config)
    a = adapter["block_0"]["attention"]["query"]["lora_a"]
    bound = 1 / np.sqrt(32)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.any(adapter["block_0"]["attention"]["query"]["lora_b"])
    assert set(lora.ranks(adapter)) == {
        f"block_{i}/attention/{t}" for i in range(2) for t in ("query", "value")
    }


def test_jit_equals_eager():
    adapter = randomised(
        lora.init_adapter(
            jax.random.key(2), BASE, lora.LoraConfig(targets=vit.TARGET_PRESETS["all"])
        ),
        jax.random.key(3),
    )
    eager = lora.fold_into_base(BASE, adapter)
    jitted = jax.jit(lora.fold_into_base)(BASE, adapter)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager, jitted)
    apply = jax.jit(lambda p, a, x: MODEL.apply({"params": p, "lora": a}, x))
    np.testing.assert_allclose(
        apply(BASE, adapter, IMAGES)["tokens"], forward(BASE, adapter)["tokens"], atol=1e-5
    )


def test_lora_dropout_only_in_training():
    model = vit.ViT(**vit.variant("mu/4", image_size=16, depth=2, lora_dropout=0.5))
    adapter = randomised(
        lora.init_adapter(
            jax.random.key(2), BASE, lora.LoraConfig(targets=vit.TARGET_PRESETS["all"])
        ),
        jax.random.key(3),
    )
    variables = {"params": BASE, "lora": adapter}
    base_model_params = {k: v for k, v in BASE.items() if k != "pooler"}
    variables["params"] = base_model_params
    eval_a = model.apply(variables, IMAGES)["pooled"]
    eval_b = model.apply(variables, IMAGES)["pooled"]
    train_a = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(0)})[
        "pooled"
    ]
    train_b = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})[
        "pooled"
    ]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert np.abs(train_a - train_b).max() > 1e-4


def test_gradients_reach_factors_not_scale():
    adapter = randomised(
        lora.init_adapter(
            jax.random.key(2), BASE, lora.LoraConfig(targets=vit.TARGET_PRESETS["qv"])
        ),
        jax.random.key(3),
    )
    grads = jax.grad(lambda a: forward(BASE, a)["pooled"].sum())(adapter)
    node = grads["block_0"]["attention"]["query"]
    assert float(node["scale"]) == 0.0 and np.abs(node["lora_a"]).max() > 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(targets="(unclosed"), "regex"),
    ],
)
def test_bad_config_is_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        lora.LoraConfig(**kwargs)


def test_targets_matching_nothing_and_shape_mismatch_are_named():
    with pytest.raises(ValueError, match="LoraConfig.targets"):
        lora.init_adapter(jax.random.key(0), BASE, lora.LoraConfig(targets="nothing_here"))
    other = vit.init_params(
        vit.ViT(**vit.variant("mu/4", image_size=16, width=48, num_heads=2, depth=2)),
        jax.random.key(0),
    )
    adapter = lora.init_adapter(jax.random.key(0), other, lora.LoraConfig())
    with pytest.raises(ValueError, match="block_0/attention/query"):
        lora.fold_into_base(BASE, adapter)


def test_variants_and_bad_variant():
    assert vit.variant("B/16") == dict(
        width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16
    )
    assert vit.variant("Ti/8", depth=4)["depth"] == 4
    with pytest.raises(ValueError, match="'X/16'"):
        vit.variant("X/16")


def test_mean_pooling_and_pos_embedding_resampling():
    model = vit.ViT(**vit.variant("mu/4", image_size=16, pool="mean"))
    params = vit.init_params(model, jax.random.key(0))
    assert "cls" not in params and params["pos_embedding"].shape == (1, 16, 32)
    out = model.apply({"params": params}, IMAGES)
    np.testing.assert_allclose(out["pooled"], out["tokens"].mean(axis=1), atol=1e-6)
    # A constant grid stays constant under bilinear resampling; the class token is kept as is.
    pos = jnp.concatenate([jnp.full((1, 1, 4), 7.0), jnp.ones((1, 16, 4))], axis=1)
    resized = vit.resample_pos_embedding(pos, 64, has_cls=True)
    assert resized.shape == (1, 65, 4)
    np.testing.assert_allclose(resized[0, 0], 7.0)
    np.testing.assert_allclose(resized[0, 1:], 1.0, atol=1e-6)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 6), alpha=st.floats(0.5, 32.0), seed=st.integers(0, 2**16))
def test_delta_is_linear_in_lora_b(rank, alpha, seed):
    """dW(a, c*b) = c * dW(a, b), and its rank never exceeds r."""
    config = lora.LoraConfig(rank=rank, alpha=alpha, targets=vit.TARGET_PRESETS["qv"])
    adapter = randomised(
        lora.init_adapter(jax.random.key(seed), BASE, config), jax.random.key(seed + 1)
    )
    doubled = lora.map_targets(lambda n: {**n, "lora_b": 2.0 * n["lora_b"]}, adapter)
    d1 = lora.delta_weights(adapter)["block_0"]["attention"]["value"]["delta"]
    d2 = lora.delta_weights(doubled)["block_0"]["attention"]["value"]["delta"]
    np.testing.assert_allclose(d2, 2.0 * d1, rtol=1e-5, atol=1e-6)
    assert (
        np.linalg.matrix_rank(np.asarray(d1, np.float64), tol=1e-5 * max(1e-6, np.abs(d1).max()))
        <= rank
    )


def test_folded_and_branch_lora_agree_in_outputs_and_gradients():
    """lora_compute only changes how the update is computed, not the function or its gradient."""
    config = lora.LoraConfig(rank=4, alpha=8, targets=vit.TARGET_PRESETS["all"])
    adapter = randomised(lora.init_adapter(jax.random.key(2), BASE, config), jax.random.key(3))
    results = []
    for compute in layers.LORA_COMPUTES:
        kwargs = vit.variant("mu/4", image_size=16, depth=2, pooler=True)
        model = vit.ViT(**kwargs, lora_compute=compute)
        loss = lambda a, m=model: m.apply({"params": BASE, "lora": a}, IMAGES, train=True)[
            "pooled"
        ].var()
        results.append((loss(adapter), jax.grad(loss)(adapter)))
    (loss_f, grad_f), (loss_m, grad_m) = results
    np.testing.assert_allclose(loss_m, loss_f, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), grad_m, grad_f
    )
