"""Zero-shot heads: CLIPModel's own logits from the file scripts/make_zero_shot_heads.py wrote
for the tiny golden CLIPModel, and the head stays frozen under jaxmerge's optimizer."""

from __future__ import annotations

import os

import golden_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import lora, run_config, training, zero_shot
from jaxmerge.models import clip

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "clip")
FILE = os.path.join(GOLDEN, "zero_shot.npz")


def golden():
    return golden_files.arrays("clip")


@pytest.mark.parametrize("task", ("shapes", "pets"))
def test_zero_shot_logits_match_clip_model(task):
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, "clip_model"))
    pooled = clip.VisionTower(**kwargs).apply({"params": params}, golden()["images"])["pooled"]
    head = zero_shot.head_def(FILE, task)
    head_params = head.init(jax.random.key(0), pooled)["params"]
    logits = head.apply({"params": head_params}, pooled)
    want = golden()[f"zero_shot/{task}/logits"]
    assert np.max(np.abs(logits - want)) / np.max(np.abs(want)) < 1e-5
    assert zero_shot.load_heads(FILE)["class_names"]["pets"] == ["cat", "dog"]


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_head_is_frozen_under_the_trainer_optimizer():
    kwargs, base, _ = clip.load_hf(os.path.join(GOLDEN, "clip_model"))
    model = clip.VisionTower(**kwargs)
    head = zero_shot.head_def(FILE, "shapes")
    images = jnp.asarray(golden()["images"])
    params = {
        "head": head.init(jax.random.key(0), jnp.zeros((1, 32)))["params"],
        "lora": lora.init_adapter(
            jax.random.key(1), base, lora.LoraConfig(rank=2, targets=clip.TARGET_PRESETS["qv"])
        ),
    }
    settings = run_config.OptimizerSettings(
        learning_rate=1e-2, steps=10, warmup_steps=0, end_learning_rate_factor=1.0,
        weight_decay=0.1, grad_clip_norm=1.0,
    )  # fmt: skip
    optimizer = training.make_optimizer(settings)
    state = optimizer.init(params)

    def loss(p):
        pooled = model.apply({"params": base, "lora": p["lora"]}, images)["pooled"]
        logits = head.apply({"params": p["head"]}, pooled)
        return -jax.nn.log_softmax(logits)[:, 0].mean()

    new = params
    for _ in range(3):
        grads = jax.grad(loss)(new)
        updates, state = optimizer.update(grads, state, new)
        new = jax.tree.map(lambda p, u: p + u, new, updates)
    for a, b in zip(jax.tree.leaves(params["head"]), jax.tree.leaves(new["head"])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(params["lora"]["block_0"]["attention"]["query"]["lora_b"],
                           new["lora"]["block_0"]["attention"]["query"]["lora_b"])  # fmt: skip


def test_missing_file_and_task_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"make it with `python -m jaxmerge zero_shot_heads "):
        zero_shot.load_heads(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match=r"no task 'cars'; it holds \['pets', 'shapes'\]"):
        zero_shot.head_def(FILE, "cars")
