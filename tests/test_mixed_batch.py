"""Mixed-adapter batches: parity with PEFT's `adapter_names` (scripts/make_golden_mixed.py),
each example equal to its adapter alone, and bad requests refused before any compute."""

from __future__ import annotations

import functools
import os

import golden_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_files import rel_err

from jaxmerge import adapter_stack, heads, lora, mixed_batch
from jaxmerge.interop import peft as peft_io
from jaxmerge.models import vit

TOL = 1e-4
GOLDEN_ADAPTERS = ("a", "b", "rank8", "rslora", "patterns")


@functools.cache
def golden_model():
    kwargs, params, _ = vit.load_hf(os.path.join(golden_files.GOLDEN, "hf_vit"))
    adapters = {
        name: peft_io.load_peft_adapter(os.path.join(golden_files.GOLDEN, "adapters", name))[0]
        for name in GOLDEN_ADAPTERS
    }
    return vit.ViT(**kwargs), params, adapters


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_mixed_batch_matches_peft_adapter_names():
    model, params, adapters = golden_model()
    golden = golden_files.arrays("mixed_batch.npz")
    names = [str(n) for n in golden["adapter_names"]]
    server = mixed_batch.make_server(model, params, adapters)
    pooled, _ = server.forward(golden["images"], names)
    tokens = mixed_batch.mixed_forward(
        model, params, server.stacked, server.index(names), golden["images"]
    )["tokens"]
    assert rel_err(tokens, golden["last_hidden_state"]) < TOL
    assert rel_err(pooled, golden["pooler_output"]) < TOL
    # The golden batch is no single adapter: the examples' outputs differ from the base's.
    base = model.apply({"params": params}, golden["images"])["tokens"]
    adapted = np.array([i for i, n in enumerate(names) if n != "__base__"])
    assert rel_err(base[adapted], golden["last_hidden_state"][adapted]) > 1e-2


@pytest.fixture(scope="module")
def tiny():
    model = vit.ViT(**vit.variant("mu/4", image_size=8))
    base = vit.init_params(model, jax.random.key(0))
    adapters = {}
    for i, (name, targets, rank) in enumerate([("x", "qv", 2), ("y", "all", 3), ("z", "mlp", 1)]):
        adapter = lora.init_adapter(
            jax.random.key(i), base, lora.LoraConfig(rank, 4.0, vit.TARGET_PRESETS[targets])
        )
        adapters[name] = lora.map_targets(
            lambda n, k=i: {
                **n,
                "lora_b": 0.3 * jax.random.normal(jax.random.key(9 + k), n["lora_b"].shape),
            },
            adapter,
        )
    head_defs = {"x": heads.MlpHead(8, 3), "y": heads.MlpHead(0, 1), "z": heads.MlpHead(4, 5)}
    feature = np.zeros((1, model.width), np.float32)
    head_set = {
        t: (h, h.init(jax.random.key(20 + i), feature)["params"])
        for i, (t, h) in enumerate(head_defs.items())
    }
    images = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    return model, base, adapters, head_set, images


def test_each_example_gets_its_own_adapter_and_head(tiny):
    model, base, adapters, head_set, images = tiny
    server = mixed_batch.make_server(model, base, adapters, head_set)
    names = ["z", None, "x", "y", "x", "__base__"]
    outputs = server.serve(images, names)
    for i, name in enumerate(names):
        variables = {"params": base}
        if name in ("x", "y", "z"):
            variables["lora"] = adapters[name]
        pooled = model.apply(variables, images[i : i + 1])["pooled"]
        want = (
            pooled
            if name not in head_set
            else head_set[name][0].apply({"params": head_set[name][1]}, pooled)
        )
        assert outputs[i].shape == want.shape[1:]
        np.testing.assert_allclose(outputs[i], want[0], atol=2e-5, rtol=1e-5)


def test_static_gates_fold_into_the_base(tiny):
    """A stack with static gates is the same function as its folded gated factors."""
    model, base, adapters, _, images = tiny
    stacked = adapter_stack.stack(list(adapters.values()))
    gates = {p: jnp.array([0.5, -1.0, 2.0]) for p in adapter_stack.paths(stacked)}
    gated = adapter_stack.with_gates(stacked, gates)
    folded = lora.fold_into_base(base, adapter_stack.fold_gates(gated))
    want = model.apply({"params": folded}, images)["pooled"]
    got = model.apply({"params": base, "lora": gated}, images)["pooled"]
    np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(ValueError, match="gated adapters"):
        lora.fold_into_base(base, gated)  # the gates would be dropped


def test_router_with_zero_kernel_is_its_bias_gate(tiny):
    model, base, adapters, _, images = tiny
    stacked = adapter_stack.stack(list(adapters.values()))
    bias = jnp.array([1.0, 0.0, 0.5])
    router = {
        p: {"kernel": jnp.zeros((n["lora_a"].shape[0], 3)), "bias": bias}
        for p, n in lora.target_items(stacked)
    }
    got = model.apply({"params": base, "lora": adapter_stack.with_router(stacked, router)}, images)
    want = model.apply({"params": base, "lora": adapter_stack.with_gates(stacked, bias)}, images)
    np.testing.assert_allclose(got["pooled"], want["pooled"], atol=2e-5)


def test_mixture_router_is_its_table_row_mean_or_one_adapter(tiny):
    """softmax(0) averages the table's rows; a router sure of task d runs adapter d alone."""
    model, base, adapters, _, images = tiny
    stacked = adapter_stack.stack(list(adapters.values()))
    per_adapter = jnp.array([[1.0, 0.0, 0.5], [0.2, -1.0, 0.0], [0.0, 2.0, 1.0]])

    def run(lora_tree):
        return model.apply({"params": base, "lora": lora_tree}, images)["pooled"]

    def mixture(bias):
        return {
            # (n, R): the rank columns of an adapter share its gate here
            p: {
                "kernel": jnp.zeros((n["lora_a"].shape[0], 3)),
                "bias": bias,
                "table": per_adapter @ n["gate_expand"],
            }
            for p, n in lora.target_items(stacked)
        }

    got = run(adapter_stack.with_router(stacked, mixture(jnp.zeros(3))))
    want = run(adapter_stack.with_gates(stacked, per_adapter.mean(0)))
    np.testing.assert_allclose(got, want, atol=2e-5)
    sure_of_first = adapter_stack.with_router(stacked, mixture(jnp.array([60.0, 0.0, 0.0])))
    want = run(adapter_stack.with_gates(stacked, per_adapter[0]))
    np.testing.assert_allclose(run(sure_of_first), want, atol=2e-5)


def test_bad_requests_are_refused(tiny):
    model, base, adapters, head_set, images = tiny
    server = mixed_batch.make_server(model, base, adapters, head_set)
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: got 'w'; allowed: one of"):
        server.serve(images[:2], ["x", "w"])
    with pytest.raises(ValueError, match="one name per image"):
        server.serve(images, ["x"])
    with pytest.raises(ValueError, match="heads: got tasks"):
        mixed_batch.make_server(model, base, adapters, {"x": head_set["x"]})
    other = vit.ViT(**vit.variant("mu/4", image_size=8, mlp_dim=64))
    other_base = vit.init_params(other, jax.random.key(1))
    with pytest.raises(ValueError, match=r"adapters\['y'\] target 'block_0/mlp/fc1'"):
        mixed_batch.make_server(other, other_base, adapters)
    dense = lora.delta_weights(adapters["x"])
    with pytest.raises(ValueError, match="holds a dense delta"):
        mixed_batch.make_server(model, base, {"x": adapters["x"], "d": dense})
