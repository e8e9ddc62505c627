"""Multi-task predictor: one forward of the merged backbone gives every task's head output."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxmerge import heads, lora, merging
from jaxmerge.model_folder import multitask
from jaxmerge.models import vit

TASKS = {"a": 10, "b": 1, "c": 4}


@pytest.fixture(scope="module")
def setup():
    model = vit.ViT(**vit.variant("mu/4", image_size=8))
    base = vit.init_params(model, jax.random.key(0))
    config = lora.LoraConfig(rank=2, targets=vit.TARGET_PRESETS["all"])
    adapters = []
    for i in range(len(TASKS)):
        adapter = lora.init_adapter(jax.random.key(10 + i), base, config)
        adapter = lora.map_targets(
            lambda n, k=i: {
                **n,
                "lora_b": 0.1 * jax.random.normal(jax.random.key(20 + k), n["lora_b"].shape),
            },
            adapter,
        )
        adapters.append(adapter)
    merged = merging.merge(adapters, "cat")
    backbone = lora.fold_into_base(base, merged)
    head_defs = {t: heads.MlpHead(16, n) for t, n in TASKS.items()}
    feature = np.zeros((1, model.width), np.float32)
    head_params = {
        t: h.init(jax.random.key(30 + i), feature)["params"]
        for i, (t, h) in enumerate(head_defs.items())
    }
    images = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
    return model, backbone, head_defs, head_params, images, base, merged


def test_outputs_equal_the_per_task_forwards(setup):
    """Against one forward per task with the merged adapter unfolded (the 'lora' collection)."""
    model, backbone, head_defs, head_params, images, base, merged = setup
    predict = multitask.make_predictor(model, head_defs)
    outputs = predict(backbone, head_params, images)
    assert list(outputs) == list(TASKS)
    for task, outputs_dim in TASKS.items():
        pooled = model.apply({"params": base, "lora": merged}, images)["pooled"]
        expected = head_defs[task].apply({"params": head_params[task]}, pooled)
        single = multitask.make_single_task_predictor(model, head_defs[task])
        assert outputs[task].shape == (5, outputs_dim)
        np.testing.assert_allclose(outputs[task], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            single(backbone, head_params[task], images), outputs[task], rtol=1e-5, atol=1e-6
        )


def test_one_forward_computes_every_head(setup):
    model, backbone, head_defs, head_params, images, *_ = setup
    calls = {"ViT": 0, "MlpHead": 0}

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and type(context.module).__name__ in calls:
            calls[type(context.module).__name__] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        multitask.multitask_forward(model, head_defs, backbone, head_params, images)
    assert calls == {"ViT": 1, "MlpHead": len(TASKS)}


def test_mismatched_heads_are_an_error(setup):
    model, backbone, head_defs, head_params, images, *_ = setup
    with pytest.raises(ValueError, match="one head and its parameters per task"):
        multitask.multitask_forward(model, head_defs, backbone, {"a": head_params["a"]}, images)
