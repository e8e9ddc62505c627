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


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
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


def test_mixture_routes_fresh_images_of_each_domain_to_their_own_adapter(tiny):
    """Images of two domains, each the training set of one task: the mixture's routers learn
    which task an image belongs to (on images they never saw), and its heads then match the
    single adapters on those images far closer than static gates' do (KL of the classifier,
    squared error of the regression)."""
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack(adapters)
    head_defs, head_params = [h[0] for h in head_set], [h[1] for h in head_set]
    settings = dict(steps=60, learning_rate=0.05)
    trees = {
        gating: fusion.fused_tree(
            stacked,
            fusion.learn_gates(model, base, stacked, head_set, inputs, gating=gating, **settings)[
                0
            ],
            gating,
        )
        for gating in ("static", "mixture")
    }
    rng = np.random.default_rng(1)
    fresh = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) + s for s in (2.0, -2.0)]
    loss = {"static": 0.0, "mixture": 0.0}
    for t, images in enumerate(fresh):
        _, sown = model.apply(
            {"params": base, "lora": trees["mixture"]}, images, mutable=["intermediates"]
        )
        route_logits = fusion.route_logits_of(sown)
        assert len(route_logits) == len(adapter_stack.paths(stacked))
        for logits in route_logits:
            assert (np.asarray(logits).argmax(-1) == t).all()
        single = adapter_stack.with_index(stacked, np.full(len(images), t))
        want = fusion.fused_forward(model, head_defs, base, single, head_params, images)[t]
        for gating, tree in trees.items():
            got = fusion.fused_forward(model, head_defs, base, tree, head_params, images)[t]
            if t == 0:  # the classifier
                p = jax.nn.log_softmax(want)
                loss[gating] += float((np.exp(p) * (p - jax.nn.log_softmax(got))).sum(-1).mean())
            else:
                loss[gating] += float(np.square(got - want).mean())
    assert loss["mixture"] < 0.25 * loss["static"]


def test_mixture_routers_learn_the_task_of_an_image_where_outputs_cannot_tell(tiny):
    """Two copies of one adapter and head: every routing gives the same outputs, so only the
    routing loss can teach the routers which task set an image came from."""
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack([adapters[0], adapters[0]])
    gates, _ = fusion.learn_gates(
        model,
        base,
        stacked,
        [head_set[0]] * 2,
        inputs,
        gating="mixture",
        steps=30,
        learning_rate=0.05,
    )
    tree = fusion.fused_tree(stacked, gates, "mixture")
    rng = np.random.default_rng(2)
    for t, shift in enumerate((2.0, -2.0)):
        images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32) + shift
        _, sown = model.apply({"params": base, "lora": tree}, images, mutable=["intermediates"])
        for logits in fusion.route_logits_of(sown):
            assert (np.asarray(logits).argmax(-1) == t).all()


def test_bad_gates_are_refused(tiny):
    model, base, adapters, head_set, inputs = tiny
    stacked = adapter_stack.stack(adapters)
    with pytest.raises(ValueError, match="gating: got 'moe'"):
        fusion.init_gates(stacked, "moe")
    router = fusion.init_gates(adapter_stack.stack(adapters[:1]), "router")
    with pytest.raises(ValueError, match=r"router\['block_0/attention/query'\]: shapes"):
        fusion.check_gates(stacked, router, "router", "router")
    mixture = fusion.init_gates(stacked, "mixture")
    mixture["block_0/attention/query"]["table"] = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"mixture\['block_0/attention/query'\]: shapes"):
        fusion.check_gates(stacked, mixture, "mixture", "mixture")
    with pytest.raises(ValueError, match="one head and one input set per adapter"):
        fusion.learn_gates(model, base, stacked, head_set[:1], inputs)
