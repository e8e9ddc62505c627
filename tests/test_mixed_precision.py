"""Mixed precision (`config.model.dtype = "bfloat16"`): bfloat16 matmuls, float32 everything
that needs the range or the bits, float32 master weights.

Stated tolerances, bfloat16 against float32 on the "mu" ViT (LoRA on every dense layer, a
non-zero adapter, LayerNorm-scaled features of size ~1): pooled features within 0.1 absolute
(measured 0.04: bfloat16 keeps 8 significant bits, 2**-8 = 0.4% per rounding), mean loss within
1% relative (measured 0.002%), gradients of the LoRA factors and the head within 6% relative
L2 norm (measured 2.6% and 1.1%) and pointing the same way (cosine > 0.998).
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import checkpoint, config_lib, heads, run_config, scoring, tasks, training
from jaxmerge.models import vit
from tests.tiny import tiny_config

MU = vit.variant("mu/4", image_size=16)


def _setup():
    base = vit.init_params(vit.ViT(**MU), jax.random.key(0))
    config = config_lib.base_config()
    config.lora.targets = "all"
    head = heads.MlpHead(16, 10)
    lora_config = run_config.of_saved(config).lora
    params = training.init_params(lora_config, "lora", vit.ViT(**MU), head, base, jax.random.key(1))
    # A trained-looking adapter: lora_b is zero at initialisation, which would hide its maths.
    keys = iter(jax.random.split(jax.random.key(3), 100))
    params["lora"] = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape) if x.ndim == 2 else x,
        params["lora"],
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    return base, head, params, batch


def _loss_and_grads(dtype, base, head, params, batch):
    model = vit.ViT(**MU, dtype=dtype)
    task = tasks.get("digits")

    def loss_fn(params):
        outputs = scoring.forward(model, head, params, base, batch["image"], False)
        return task.head_kind.loss(outputs, batch, task.loss_spec).mean()

    pooled = model.apply({"params": base, "lora": params["lora"]}, batch["image"])["pooled"]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return pooled, loss, grads


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_bfloat16_forward_loss_and_gradients_match_float32():
    base, head, params, batch = _setup()
    pooled32, loss32, grads32 = _loss_and_grads(None, base, head, params, batch)
    pooled16, loss16, grads16 = _loss_and_grads(jnp.bfloat16, base, head, params, batch)
    assert pooled16.dtype == jnp.float32 and loss16.dtype == jnp.float32
    assert float(jnp.abs(pooled16 - pooled32).max()) < 0.1
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    for part in ("lora", "head"):
        # Gradients reach the float32 master weights as float32.
        assert {x.dtype for x in jax.tree.leaves(grads16[part])} == {jnp.dtype(jnp.float32)}
        a, b = _flat(grads16[part]), _flat(grads32[part])
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.06, part
        assert float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) > 0.998, part


def _primitive_dtypes(closed_jaxpr) -> collections.Counter:
    """(primitive, dtype of its first input) -> count, through every nested jaxpr."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name, str(eqn.invars[0].aval.dtype)] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return counts


@pytest.mark.parametrize("kernels", ["plain", "cpu"])
def test_bfloat16_is_real_where_it_should_be(kernels):
    """Every matmul of the backbone runs in bfloat16; softmax's exp and LayerNorm's statistics
    in float32."""
    base, _, params, batch = _setup()
    model = vit.ViT(**MU, dtype=jnp.bfloat16, kernels=kernels, pooler=True)
    base = vit.init_params(model, jax.random.key(0))
    forward = lambda lora: model.apply({"params": base, "lora": lora}, batch["image"])  # noqa: E731
    counts = _primitive_dtypes(jax.make_jaxpr(forward)(params["lora"]))
    dots = {dtype: n for (name, dtype), n in counts.items() if name == "dot_general"}
    # patch embedding, qkv (one matmul), out, fc1, fc2, pooler, q @ k, weights @ v, and the
    # LoRA branches (two matmuls each on 6 targets): all bfloat16.
    assert set(dots) == {"bfloat16"} and dots["bfloat16"] >= 8
    assert counts["exp", "float32"] >= 1 and counts["exp", "bfloat16"] == 0
    assert counts["rsqrt", "float32"] == 3 and counts["rsqrt", "bfloat16"] == 0  # 3 LayerNorms


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_bfloat16_training_on_eight_devices_keeps_float32_master_weights(data_dir, tmp_path):  # noqa: F811
    """A bfloat16 run trains data parallel on 8 devices, ends near the float32 run, and its
    checkpoint holds float32 LoRA factors, head and optimizer moments."""
    assert jax.device_count() == 8
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(data_dir, steps=20, **{"model.dtype": dtype})
        results[dtype] = training.train_and_evaluate(config, str(tmp_path / dtype))
    assert abs(results["bfloat16"]["accuracy"] - results["float32"]["accuracy"]) < 0.1
    assert results["bfloat16"]["loss"] == pytest.approx(results["float32"]["loss"], rel=0.1)
    run = training.run_dir(str(tmp_path / "bfloat16"), "lora", "digits")
    params, metadata = checkpoint.load(os.path.join(run, "checkpoints"))
    assert metadata["config"]["model"]["dtype"] == "bfloat16"
    assert set(params) == {"lora", "head"}
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    saved = checkpoint.manager(os.path.join(run, "checkpoints"), create=False).item_metadata(20)
    moments = jax.tree.leaves(saved["opt_state"], is_leaf=lambda x: hasattr(x, "dtype"))
    assert moments and {np.dtype(x.dtype) for x in moments} <= {
        np.dtype(np.float32),
        np.dtype(np.int32),  # Adam's step count
    }


def test_bfloat16_scorer_keeps_images_in_bfloat16_with_the_same_scores(data_dir):  # noqa: F811
    """The study's scorer caches eval images on the device; for a bfloat16 ViT in bfloat16
    (half the memory), which changes no score: the patch embedding casts them first."""
    from jaxmerge import input_pipeline

    config = tiny_config(data_dir, **{"model.dtype": "bfloat16"})
    model = vit.ViT(**vit.variant("mu/4", image_size=8), dtype=jnp.bfloat16)
    base = vit.init_params(model, jax.random.key(0))
    head_def = heads.MlpHead(16, 10)
    head = head_def.init(jax.random.key(1), jnp.zeros((1, model.width)))["params"]
    task = tasks.get("digits")
    settings = run_config.resolve(config).data
    scorer = scoring.Scorer(task, head_def, model, settings)
    assert {b["image"].dtype for b in scorer.batches} == {jnp.dtype(jnp.bfloat16)}
    cached = scorer(base, head)
    step = scoring.make_eval_step(model, head_def, task)
    batches = input_pipeline.eval_batches(task, settings, model.image_size)  # float32 images
    plain = scoring.evaluate(step, {"head": head}, base, batches, input_pipeline.data_mesh())
    assert cached == pytest.approx(plain, abs=1e-6) and cached["examples"] == 359
