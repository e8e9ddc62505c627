"""Learned merging: gradients against finite differences, closed-form special cases, the
objective going down, determinism, errors, 8 devices, and rebuilding from saved coefficients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import heads, learned, lora, merging
from jaxmerge.merging import regmean as regmean_math
from jaxmerge.models import vit

MODEL = vit.ViT(**vit.variant("mu/4", image_size=8, depth=2))
BASE = vit.init_params(MODEL, jax.random.key(0))
CONFIG = lora.LoraConfig(rank=2, targets=vit.TARGET_PRESETS["qv"])


def _adapter(seed):
    adapter = lora.init_adapter(jax.random.key(seed), BASE, CONFIG)
    noise = lambda x, k: x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 2 else x  # noqa: E731
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    return jax.tree.map(lambda x: noise(x, next(keys)), adapter)


def _head(kind, outputs, spec, seed):
    head_def = heads.MlpHead(8, outputs)
    params = head_def.init(jax.random.key(seed), jnp.zeros((1, 32)))["params"]
    return learned.Head(head_def, params, kind, spec)


ADAPTERS = [_adapter(1), _adapter(2), _adapter(3)]
CLASSIFY = _head("classification", 3, {"target": "label"}, 4)
REGRESS = _head("regression", 1, {"target": "value", "mean": 0.0, "std": 1.0}, 5)
REGRESS_MSE = _head("regression", 1, {"target": "value", "mean": 0.0, "std": 1.0, "loss": "mse"}, 5)
LANDMARKS = _head("landmarks", 4, {"target": "landmarks", "norm_points": (0, 1)}, 6)
IMAGES = [np.asarray(jax.random.normal(jax.random.key(s), (16, 8, 8, 3))) for s in (7, 8, 9)]
LABELS = [
    {"label": np.arange(16) % 3},
    {"value": np.linspace(-1, 1, 16)},
    {"label": np.arange(16) % 2},
]


def _dense(tree):
    return {p: np.asarray(lora.delta_of(n), np.float64) for p, n in lora.target_items(tree)}


def _finite_difference_check(f, coefficients, eps=3e-3):
    """The directional derivative of f along a random direction, against a central difference
    (float32: a step of 3e-3 keeps round-off well below the 2% tolerance)."""
    leaves, treedef = jax.tree.flatten(coefficients)
    keys = jax.random.split(jax.random.key(11), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    grad = jax.grad(f)(coefficients)
    analytic = sum(
        float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    shift = lambda t: jax.tree.map(lambda c, d: c + t * d, coefficients, direction)  # noqa: E731
    numeric = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-4)


@pytest.mark.parametrize(
    "objective, granularity, base_merge, task_heads",
    [
        pytest.param(  # CI's own step: keeps the README's suite under 10 minutes
            "entropy", "layer", "task_arithmetic", [CLASSIFY] * 3, marks=pytest.mark.slow
        ),
        pytest.param("entropy", "task", "ties", [CLASSIFY] * 3, marks=pytest.mark.slow),
        ("output_match", "core", "task_arithmetic", [CLASSIFY, REGRESS, LANDMARKS]),
        ("output_match", "rank", "task_arithmetic", [CLASSIFY, REGRESS, LANDMARKS]),
        # Smooth losses only: L1 kinks would defeat a finite difference.
        ("supervised", "layer", "task_arithmetic", [CLASSIFY, REGRESS_MSE, CLASSIFY]),
    ],
)
def test_gradient_of_each_objective_matches_finite_differences(
    objective, granularity, base_merge, task_heads
):
    f, init = learned.objective_function(
        MODEL,
        BASE,
        ADAPTERS,
        task_heads,
        IMAGES,
        objective=objective,
        granularity=granularity,
        base_merge=base_merge,
        init=0.7,
        labels=LABELS,
        density=0.5,
    )
    _finite_difference_check(f, init)


@pytest.mark.parametrize("granularity", ["task", "layer", "rank", "core"])
def test_one_adapter_with_coefficient_one_is_the_single_adapter(granularity):
    paths, parts = learned.coefficients.parts_of(ADAPTERS[:1], "task_arithmetic", 0.2)
    ones = learned.init_coefficients(ADAPTERS[:1], granularity, 1.0)
    tree = learned.merged_tree(ones, parts, paths, granularity, "task_arithmetic")
    single, merged = _dense(ADAPTERS[0]), _dense(tree)
    for path in single:
        np.testing.assert_allclose(merged[path], single[path], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base_merge", ["task_arithmetic", "ties"])
def test_layer_wise_with_equal_coefficients_is_task_wise(base_merge):
    paths, parts = learned.coefficients.parts_of(ADAPTERS, base_merge, 0.5)
    task = jnp.asarray([0.3, 0.9, -0.4])
    layer = {path: task for path in paths}
    a = _dense(learned.merged_tree(task, parts, paths, "task", base_merge))
    b = _dense(learned.merged_tree(layer, parts, paths, "layer", base_merge))
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])


def test_task_wise_coefficients_are_task_arithmetic_weights():
    paths, parts = learned.coefficients.parts_of(ADAPTERS, "task_arithmetic", 0.2)
    weights = [0.3, 0.9, -0.4]
    got = _dense(learned.merged_tree(jnp.asarray(weights), parts, paths, "task", "task_arithmetic"))
    want = _dense(merging.merge(ADAPTERS, "task_arithmetic", weights))
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "task_heads, settings, message",
    [
        (
            [CLASSIFY, REGRESS],
            dict(objective="entropy"),
            "objective: 'entropy' needs classification heads.*heads\\[1\\] is a 'regression' head",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(objective="supervised"),
            "labels: objective='supervised' needs per-task labels",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(objective="output_match", granularity="core", base_merge="ties"),
            "granularity: 'core' acts on the factors",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(objective="output_match", batch_size=64),
            "inputs\\[0\\]: has 16 images; allowed: at least batch_size=64",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(objective="output_match", steps=0),
            "steps: got 0; allowed: an integer >= 1",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(objective="likelihood"),
            "objective: got 'likelihood'; allowed: one of",
        ),
        ([CLASSIFY], dict(objective="output_match"), "got 2 adapters, 1 heads and 2 input sets"),
        (
            [CLASSIFY, CLASSIFY],
            dict(granularity="layer", start="regmean"),
            "start: 'regmean' is a start for granularity='core'; got 'layer'",
        ),
        (
            [CLASSIFY, CLASSIFY],
            dict(start="regmean", reduce_non_diagonal_ratio=1.0),
            "reduce_non_diagonal_ratio: got 1.0; allowed",
        ),
    ],
)
def test_bad_settings_are_refused_before_compute(task_heads, settings, message):
    with pytest.raises(ValueError, match=message):
        learned.learn_merge(MODEL, BASE, ADAPTERS[:2], task_heads, IMAGES[:2], **settings)


def test_core_regmean_is_regmean_when_the_factors_span_the_layer():
    """Two rank-4 adapters of an 8 x 8 layer span it: RegMean restricted to the core space
    (an R x R solve) must then equal RegMean's own (in x in) closed form."""
    keys = iter(jax.random.split(jax.random.key(21), 8))
    scaled_a = [jax.random.normal(next(keys), (8, 4)) for _ in range(2)]
    bs = [jax.random.normal(next(keys), (4, 8)) for _ in range(2)]
    inputs = [jax.random.normal(next(keys), (64, 8)) * jnp.arange(1, 9) for _ in range(2)]
    grams = [x.T @ x / 64 for x in inputs]
    core = learned.core_regmean(scaled_a, grams, 0.95)
    got = jnp.concatenate(scaled_a, 1) @ core @ jnp.concatenate(bs, 0)
    deltas = jnp.stack([a @ b for a, b in zip(scaled_a, bs)])
    want, _ = regmean_math.regmean_layer(jnp.stack(grams), deltas, 0.95)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_regmean_start_fits_a_lower_objective_than_the_sum_in_as_many_steps():
    _, _, from_sum = _learn(granularity="core", steps=10)
    _, _, from_regmean = _learn(granularity="core", steps=10, start="regmean")
    assert from_regmean[0] < from_sum[0]
    assert from_regmean[-3:].mean() < from_sum[-3:].mean()


def _learn(**settings):
    defaults = dict(objective="output_match", steps=30, batch_size=8, key=jax.random.key(3))
    return learned.learn_merge(
        MODEL, BASE, ADAPTERS, [CLASSIFY, REGRESS, LANDMARKS], IMAGES, **{**defaults, **settings}
    )


def test_a_short_run_lowers_the_objective_and_the_same_seed_gives_the_same_result():
    tree_a, coefficients_a, history_a = _learn()
    tree_b, coefficients_b, history_b = _learn()
    assert history_a[-5:].mean() < 0.8 * history_a[:5].mean()
    np.testing.assert_array_equal(history_a, history_b)
    jax.tree.map(np.testing.assert_array_equal, coefficients_a, coefficients_b)
    _, _, history_c = _learn(key=jax.random.key(4))
    assert not np.array_equal(history_a, history_c)
    lora.fold_into_base(BASE, tree_a)  # a plain tree that folding takes


@pytest.mark.parametrize(
    "granularity, base_merge",
    [("core", "task_arithmetic"), ("rank", "task_arithmetic"), ("layer", "ties")],
)
def test_saved_coefficients_rebuild_the_merge_without_relearning(granularity, base_merge):
    tree, coefficients, _ = _learn(
        granularity=granularity, base_merge=base_merge, density=0.5, steps=5
    )
    saved = json.loads(json.dumps(learned.coefficients_to_json(coefficients)))
    again = learned.rebuild(
        ADAPTERS,
        learned.coefficients_from_json(saved, granularity),
        granularity,
        base_merge,
        density=0.5,
    )
    for path, value in _dense(tree).items():
        np.testing.assert_allclose(_dense(again)[path], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_learning_on_eight_devices_matches_one_device():
    from jaxmerge import input_pipeline

    assert jax.device_count() == 8
    one = _learn(steps=10)
    eight = _learn(steps=10, mesh=input_pipeline.data_mesh())
    np.testing.assert_allclose(eight[2], one[2], rtol=1e-4, atol=1e-6)
