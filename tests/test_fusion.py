"""Fused multi-task models: learned gates over an adapter stack (jaxmerge.fusion)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmerge import adapter_stack, fusion, heads, lora
from jaxmerge.models import vit


@pytest.fixture(scope="module")
def tiny():
    model = vit.ViT(**vit.variant("mu/4", image_size=8))
    base = vit.init_params(model, jax.random.key(0))
    adapters = []
    for i in range(2):
        adapter = lora.init_adapter(
            jax.random.key(i), base, lora.LoraConfig(2, 4.0, vit.TARGET_PRESETS["qv"])
        )
        adapters.append(
            lora.map_targets(
                lambda n, k=i: {
                    **n,
                    "lora_b": 0.5 * jax.random.normal(jax.random.key(9 + k), n["lora_b"].shape),
                },
                adapter,
            )
        )
    feature = np.zeros((1, model.width), np.float32)
    head_set = [
        (h, h.init(jax.random.key(5 + i), feature)["params"], kind, {})
        for i, (h, kind) in enumerate(
            [(heads.MlpHead(0, 4), "classification"), (heads.MlpHead(0, 1), "regression")]
        )
    ]
    rng = np.random.default_rng(0)
    # Two image domains a router can tell apart by their mean.
    inputs = [rng.normal(size=(32, 8, 8, 3)).astype(np.float32) + s for s in (2.0, -2.0)]
    return model, base, adapters, head_set, inputs


def test_one_adapter_gates_converge_to_one(tiny):
    """With one adapter the fused model equals its single adapter at g = 1 exactly, the
    objective's unique minimum."""
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack(adapters[:1])
    gates, history = fusion.learn_gates(
        model, base, stacked, head_set[:1], inputs[:1], init=0.3, steps=60, learning_rate=0.05
    )
    assert history[-1] < 1e-2 * history[0]
    for gate in gates.values():
        np.testing.assert_allclose(gate, [1.0], atol=0.05)


def test_router_fits_two_domains_better_than_static_gates(tiny):
    """Each task's images want their own adapter alone: a per-image router can give that, one
    static gate per layer cannot."""
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack(adapters)
    settings = dict(steps=60, learning_rate=0.05)
    static, static_history = fusion.learn_gates(model, base, stacked, head_set, inputs, **settings)
    _, router_history = fusion.learn_gates(
        model, base, stacked, head_set, inputs, gating="router", init=static, **settings
    )
    assert router_history[-1] < 0.75 * static_history[-1]


def test_bad_gates_are_refused(tiny):
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack(adapters)
    with pytest.raises(ValueError, match="gating: got 'moe'"):
        fusion.init_gates(stacked, "moe")
    router = fusion.init_gates(adapter_stack.stack(adapters[:1]), "router")
    with pytest.raises(ValueError, match=r"router\['block_0/attention/query'\]: shapes"):
        fusion.check_gates(stacked, router, "router", "router")
    with pytest.raises(ValueError, match="one head and one input set per adapter"):
        fusion.learn_gates(model, base, stacked, head_set[:1], inputs)
