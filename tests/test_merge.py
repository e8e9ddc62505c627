"""Tests of jaxmerge.merging: invariants of every registered method, exactness, validation."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmerge import lora, merging
from jaxmerge.merging import ops as mu
from jaxmerge.merging import threefry

SHAPES = {"block_0/attention/query": (10, 8), "block_0/attention/value": (10, 12)}
QUERY = "block_0/attention/query"
METHODS = sorted(merging.METHODS)
KEY = jax.random.key(0)


def make_adapter(seed, ranks=3, dtype=jnp.float32, shapes=SHAPES):
    """Random nonzero factors; `ranks` is an int or {path: rank}; scale alpha/r with alpha 2."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for path, (fan_in, fan_out) in shapes.items():
        rank = ranks if isinstance(ranks, int) else ranks[path]
        node = {
            "lora_a": jnp.asarray(rng.standard_normal((fan_in, rank)), dtype),
            "lora_b": jnp.asarray(rng.standard_normal((rank, fan_out)), dtype),
            "scale": jnp.asarray(2.0 / rank, jnp.float32),
        }
        adapter = lora.set_at(adapter, path, node)
    return adapter


def required(method):
    """The parameters a method cannot run without (PEFT's pruning methods need a density)."""
    params = merging.METHODS[method].params
    return {"density": 0.5} if params.get("density") is inspect.Parameter.empty else {}


def deltas(tree):
    return {
        path: np.asarray(lora.delta_of(node), np.float64) for path, node in lora.target_items(tree)
    }


def weighted_delta_sum(adapters, weights):
    out = {path: 0.0 for path in SHAPES}
    for adapter, weight in zip(adapters, weights):
        for path, delta in deltas(adapter).items():
            out[path] = out[path] + weight * delta
    return out


def assert_deltas_close(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for path in want:
        scale = max(np.abs(want[path]).max(), 1e-12)
        np.testing.assert_allclose(got[path] / scale, want[path] / scale, atol=rtol, err_msg=path)


ADAPTERS = [make_adapter(seed) for seed in range(3)]
WEIGHTS = [0.7, -0.4, 1.3]


# ----------------------------------------------------------------------------- every method


# Eager runs take up to 10 s a method: the README's suite compares jit and eager on one method
# of each family, CI's own step on every method (keeps the README's suite under 10 minutes).
# Every method's jitted result stays in this suite (the other tests here, test_core_space, the
# FusionBench and PEFT parity files).
EAGER_IN_SUITE = {"cat", "linear", "ties", "dare_ties", "ties_svd", "task_arithmetic", "tsv"}


def _structure_cases():
    """Every method in float32; in bfloat16 one method of each family in the README's suite,
    every method in CI's own step (keeps the README's suite under 10 minutes)."""
    cases = []
    for method in METHODS:
        slow = () if method in EAGER_IN_SUITE | {"iso_c", "core_tsv"} else pytest.mark.slow
        cases.append(pytest.param(method, jnp.float32, id=f"{method}-f32"))
        cases.append(pytest.param(method, jnp.bfloat16, id=f"{method}-bf16", marks=slow))
    return cases


@pytest.mark.parametrize("method, dtype", _structure_cases())
def test_keeps_structure_and_dtype(method, dtype):
    adapters = [make_adapter(seed, dtype=dtype) for seed in range(3)]
    merged = merging.merge(adapters, method, WEIGHTS, key=KEY, **required(method))
    items = lora.target_items(merged)
    assert [path for path, _ in items] == sorted(SHAPES)
    for path, node in items:
        if "delta" in node:
            assert set(node) == {"delta"}
        else:
            assert set(node) == set(lora.FACTORS)
            assert node["lora_a"].shape[0] == SHAPES[path][0]
            assert node["lora_b"].shape[1] == SHAPES[path][1]
            assert node["lora_b"].dtype == dtype
            assert node["scale"].shape == ()
        delta = lora.delta_of(node)
        assert delta.shape == SHAPES[path] and delta.dtype == dtype
        assert bool(jnp.isfinite(delta.astype(jnp.float32)).all())


@pytest.mark.parametrize(
    "method",
    [m if m in EAGER_IN_SUITE else pytest.param(m, marks=pytest.mark.slow) for m in METHODS],
)
def test_jit_equals_eager(method):
    params = required(method)
    if "steps" in merging.METHODS[method].params:  # WUDI's Adam: 10 steps say as much as 300
        params["steps"] = 10
    jitted = merging.merge(ADAPTERS, method, WEIGHTS, key=KEY, **params)
    with jax.disable_jit():
        eager = merging.merge(ADAPTERS, method, WEIGHTS, key=KEY, **params)
    assert_deltas_close(deltas(jitted), deltas(eager), rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_zero_valued_adapters_give_zero_delta(method):
    zeros = [lora.zeros_like_adapter(adapter) for adapter in ADAPTERS]
    merged = merging.merge(zeros, method, WEIGHTS, key=KEY, **required(method))
    for path, delta in deltas(merged).items():
        assert np.abs(delta).max() == 0.0, path


@pytest.mark.parametrize("method", [m for m in METHODS if merging.METHODS[m].needs_key])
def test_random_methods_are_deterministic_per_key(method):
    def run(key):
        return deltas(merging.merge(ADAPTERS, method, WEIGHTS, key=key, **required(method)))

    first, again, other = run(KEY), run(KEY), run(jax.random.key(1))
    for path in SHAPES:
        np.testing.assert_array_equal(first[path], again[path])
        assert not np.array_equal(first[path], other[path])


# ----------------------------------------------------------------------------- exactness


def test_cat_is_the_exact_weighted_sum_even_for_unequal_ranks():
    adapters = [make_adapter(0, ranks=2), make_adapter(1, ranks=5)]
    merged = merging.merge(adapters, "cat", [0.3, -1.7])
    assert merged[("block_0")]["attention"]["query"]["lora_a"].shape == (10, 7)
    assert_deltas_close(deltas(merged), weighted_delta_sum(adapters, [0.3, -1.7]))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "svd", "ties"])
def test_single_adapter_with_weight_one_is_identity(method):
    # PEFT merges a single adapter with `linear` whatever the method, so ties/svd are too.
    merged = merging.merge(
        ADAPTERS[:1], method, [1.0], **({"density": 0.3} if method == "ties" else {})
    )
    assert_deltas_close(deltas(merged), deltas(ADAPTERS[0]))


@pytest.mark.parametrize("method", ["ties_delta", "knots"])
def test_ties_with_density_one_and_one_adapter_is_identity(method):
    merged = merging.merge(ADAPTERS[:1], method, [1.0], density=1.0)
    assert_deltas_close(deltas(merged), deltas(ADAPTERS[0]), rtol=1e-5)


def test_svd_at_full_rank_reproduces_the_weighted_sum():
    adapters = [make_adapter(0, ranks=2), make_adapter(1, ranks=3)]
    merged = merging.merge(adapters, "svd", [0.5, 2.0], svd_rank=5)
    assert_deltas_close(deltas(merged), weighted_delta_sum(adapters, [0.5, 2.0]))


def test_thin_and_dense_svd_give_the_same_factors():
    # magnitude_prune_svd at density 1 is `svd` through a dense d x d SVD; with the canonical
    # signs the factors themselves (not only their product) must agree.
    thin = merging.merge(ADAPTERS, "svd", WEIGHTS, svd_rank=4)
    dense = merging.merge(ADAPTERS, "magnitude_prune_svd", WEIGHTS, density=1.0, svd_rank=4)
    for (_, t), (_, d) in zip(lora.target_items(thin), lora.target_items(dense)):
        scale = float(jnp.abs(d["lora_b"]).max())
        np.testing.assert_allclose(t["lora_a"], d["lora_a"], atol=1e-4)
        np.testing.assert_allclose(t["lora_b"] / scale, d["lora_b"] / scale, atol=1e-4)


def test_svd_clamp_bounds_every_factor_entry():
    merged = merging.merge(ADAPTERS, "svd", WEIGHTS, svd_clamp=0.8)
    unclamped = merging.merge(ADAPTERS, "svd", WEIGHTS)
    for (_, node), (_, raw) in zip(lora.target_items(merged), lora.target_items(unclamped)):
        values = np.concatenate([np.ravel(raw["lora_a"]), np.ravel(raw["lora_b"])])
        high = np.quantile(values, 0.8)
        for name in ("lora_a", "lora_b"):
            np.testing.assert_allclose(node[name], np.clip(raw[name], -high, high), atol=1e-6)


@pytest.mark.parametrize("method", [m for m in METHODS if "output" in merging.METHODS[m].params])
def test_factored_output_at_full_rank_equals_delta_output(method):
    full_rank = max(min(shape) for shape in SHAPES.values())  # padded with zeros where larger
    delta = merging.merge(ADAPTERS, method, WEIGHTS, key=KEY, output="delta")
    factored = merging.merge(ADAPTERS, method, WEIGHTS, key=KEY, output="factored", rank=full_rank)
    assert lora.ranks(factored) == {path: full_rank for path in SHAPES}
    assert_deltas_close(deltas(factored), deltas(delta), rtol=1e-5)


def test_task_arithmetic_scale_multiplies_the_sum():
    merged = merging.merge(ADAPTERS, "task_arithmetic", WEIGHTS, scale=0.3)
    want = {p: 0.3 * d for p, d in weighted_delta_sum(ADAPTERS, WEIGHTS).items()}
    assert_deltas_close(deltas(merged), want)


def test_pruning_masks_keep_the_requested_counts():
    rng = np.random.default_rng(0)
    magnitudes = rng.permutation(100) + 0.5  # distinct: 0.5, 1.5, ..., 99.5
    values = jnp.asarray(magnitudes * rng.choice([-1.0, 1.0], 100), jnp.float32)
    top = mu.top_magnitude_mask(values, 0.3)
    assert int(top.sum()) == 30 and float(jnp.abs(values[top]).min()) == 70.5
    band = mu.magnitude_band_mask(values, 0.5, 0.1)  # drops 90.5..99.5, keeps 40.5..89.5
    kept = np.abs(np.asarray(values[band]))
    assert kept.size == 50 and kept.max() == 89.5 and kept.min() == 40.5
    noisy = np.abs(rng.standard_normal(1000)).astype(np.float32)
    noisy[:100] = 0.0  # ties at zero
    for k in (1, 17, 900, 950, 1000):
        assert float(mu.kth_largest(jnp.asarray(noisy), k)) == np.sort(noisy)[-k]


@pytest.mark.parametrize(
    "kind", ["normal", "lora_product", "half_zeros", "ties", "constant", "every_exponent"]
)
def test_magnitude_selection_equals_a_sort(kind):
    # The k-th largest by radix passes against numpy's sort, and the mask `|t| >= t_(k)` with
    # the ties it keeps, on data with many repeated magnitudes.
    rng = np.random.default_rng(1)
    values = {
        "normal": rng.standard_normal(5000),
        "lora_product": (rng.standard_normal((60, 4)) @ rng.standard_normal((4, 50))).ravel(),
        "half_zeros": np.where(rng.random(5000) < 0.5, 0.0, rng.standard_normal(5000)),
        "ties": np.round(rng.standard_normal(5000) * 2) / 2,
        "constant": np.full(5000, -0.25),
        # magnitudes from 1e-35 to 1e35: every exponent bit, bit 30 (|x| >= 2) among them
        "every_exponent": rng.standard_normal(5000) * 10.0 ** rng.uniform(-35, 35, 5000),
    }[kind].astype(np.float32)
    magnitude = np.abs(values)
    for density in (0.001, 0.2, 0.5, 0.9, 0.9999):
        k = int(density * values.size)
        want = np.sort(magnitude)[-k]
        assert float(mu.kth_largest(jnp.asarray(magnitude), k)) == want
        mask = np.asarray(mu.top_magnitude_mask(jnp.asarray(values), density))
        np.testing.assert_array_equal(mask, magnitude >= want)


@pytest.mark.parametrize("batch", [2**24, 700])
def test_batched_pruning_equals_one_stack_at_a_time(batch, monkeypatch):
    # magnitude_prune_each selects stacks of equal task size in one loop; every stack's result
    # must equal a sort-based selection of each task tensor alone, also with the stacks split
    # over several loops (700 entries: the (3, 40, 8) stacks one a loop).
    monkeypatch.setattr(mu, "SELECTION_BATCH", batch)
    rng = np.random.default_rng(2)
    shapes = [(3, 40, 8), (3, 8, 40), (2, 30, 30), (3, 40, 8), (1, 7, 5)]
    stacks = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    stacks[1][0, :20] = 0.0  # ties at zero
    stacks[2] = np.round(stacks[2] * 2) / 2  # many tied magnitudes
    for density in (0.2, 0.5):
        pruned = mu.magnitude_prune_each([jnp.asarray(s) for s in stacks], density)
        for stack, got in zip(stacks, pruned):
            for task, result in zip(stack, np.asarray(got)):
                magnitude = np.abs(task)
                want = np.sort(magnitude.ravel())[-int(density * task.size)]
                np.testing.assert_array_equal(result, np.where(magnitude >= want, task, 0.0))


@pytest.mark.parametrize(
    ("method", "mean_of"), [("dare_delta", "task_arithmetic"), ("dare_linear", "linear")]
)
def test_dare_is_unbiased(method, mean_of):
    # dare_delta: E[m / p] = 1 entrywise. PEFT's dare_linear: independent masks on A and B, so
    # E[A' B'] = E[A'] E[B'] = A B of `linear`. The tolerance is 6 standard errors of the mean.
    samples = 2000
    keys = jax.random.split(KEY, samples)
    runs = jax.vmap(lambda key: merging.merge(ADAPTERS, method, WEIGHTS, key=key, density=0.4))(
        keys
    )
    expected = deltas(merging.merge(ADAPTERS, mean_of, WEIGHTS))
    for path, node in lora.target_items(runs):
        sampled = np.asarray(jax.vmap(lora.delta_of)(node), np.float64)
        error = np.abs(sampled.mean(0) - expected[path])
        standard_error = sampled.std(0) / np.sqrt(samples)
        assert (error <= 6 * standard_error + 1e-6).all(), path


@pytest.mark.parametrize(
    "key",
    [
        jax.random.key(0),
        jax.random.key(2**31 + 5),
        jax.random.PRNGKey(3),
        jax.random.key(1, impl="rbg"),
    ],
    ids=["key0", "key_large", "raw_uint32", "rbg"],
)
def test_fused_threefry_bits_equal_jax_random_bits(key):
    for count in (1, 7, 4099):
        got = jax.jit(threefry.random_bits, static_argnums=1)(key, count)
        np.testing.assert_array_equal(got, jax.random.bits(key, (count,), jnp.uint32))
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        keys = jax.random.split(key, 3)
        batched = jax.vmap(lambda k: threefry.random_bits(k, 50))(keys)
        want = jax.vmap(lambda k: jax.random.bits(k, (50,), jnp.uint32))(keys)
        np.testing.assert_array_equal(batched, want)


@pytest.mark.parametrize("density", [0.5, 0.1, 0.3, 1e-7, 1 - 2**-24])
def test_dare_mask_is_the_uniform_comparison(density):
    # jax.random.uniform's number of a draw is (bits >> 9) / 2^23; the integer threshold must
    # give the same mask, at the boundary too.
    threshold = threefry.uniform_threshold(density)
    edge = [max(threshold - 513, 0), max(threshold - 1, 0), threshold, threshold + 511]
    drawn = np.asarray(jax.random.bits(KEY, (20_000,), jnp.uint32))
    bits = np.concatenate([np.minimum(edge, 2**32 - 1).astype(np.uint32), drawn])
    floats = (bits >> np.uint32(9)).astype(np.float64) / 2**23
    want = floats < np.float32(density)
    pruned = mu.random_prune(jnp.asarray(bits), jnp.ones(bits.shape, jnp.float32), density)
    np.testing.assert_array_equal(np.asarray(pruned) != 0, want)
    np.testing.assert_array_equal(np.asarray(pruned)[want], np.float32(1.0) / np.float32(density))


def test_dare_delta_keeps_the_uniform_stream():
    # The masks are the ones `jax.random.uniform(key, (total,)) < density` gave before the
    # fused draw: one flat stream, sliced per target in path order, task after task.
    density = 0.3
    merged = deltas(merging.merge(ADAPTERS, "dare_delta", WEIGHTS, key=KEY, density=density))
    sizes = {path: len(ADAPTERS) * SHAPES[path][0] * SHAPES[path][1] for path in sorted(SHAPES)}
    uniform = np.asarray(jax.random.uniform(KEY, (sum(sizes.values()),)))
    start = 0
    for path in sorted(SHAPES):
        shape = (len(ADAPTERS), *SHAPES[path])
        keep = uniform[start : start + sizes[path]].reshape(shape) < density
        start += sizes[path]
        task_deltas = np.stack([deltas(adapter)[path] for adapter in ADAPTERS])
        kept = np.where(keep, task_deltas / density, 0.0)
        want = np.tensordot(np.asarray(WEIGHTS, np.float64), kept, 1)
        np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_dare_keep_fraction_is_within_a_binomial_bound():
    count, density = 1_000_000, 0.3
    bits = threefry.random_bits(jax.random.key(5), count)
    kept = int((mu.random_prune(bits, jnp.ones((count,), jnp.float32), density) != 0).sum())
    sigma = np.sqrt(count * density * (1 - density))
    assert abs(kept - count * density) <= 5 * sigma, kept


# ----------------------------------------------------------------------------- properties


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    st.lists(st.floats(-3, 3), min_size=3, max_size=3),
)
def test_cat_is_linear_in_the_weights(w1, w2):
    both = deltas(merging.merge(ADAPTERS, "cat", np.add(w1, w2)))
    one, two = (
        deltas(merging.merge(ADAPTERS, "cat", w1)),
        deltas(merging.merge(ADAPTERS, "cat", w2)),
    )
    for path in SHAPES:
        np.testing.assert_allclose(
            both[path], one[path] + two[path], atol=1e-4 * (1 + np.abs(both[path]).max())
        )


@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=3, max_size=3), st.floats(0.01, 10))
def test_linear_is_positively_homogeneous(weights, factor):
    # (sum sqrt(c w_i s_i) a_i)(sum sqrt(c w_i s_i) b_i) = c * merged(w) for c > 0.
    scaled = deltas(merging.merge(ADAPTERS, "linear", np.multiply(weights, factor)))
    plain = deltas(merging.merge(ADAPTERS, "linear", weights))
    for path in SHAPES:
        tol = 1e-4 * (1 + np.abs(scaled[path]).max())
        np.testing.assert_allclose(scaled[path], factor * plain[path], atol=tol)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.lists(st.floats(-3, 3), min_size=3, max_size=3), st.integers(0, 99))
def test_svd_rank_is_bounded(svd_rank, weights, seed):
    adapters = [make_adapter(seed + i) for i in range(3)]
    merged = merging.merge(adapters, "svd", weights, svd_rank=svd_rank)
    for path, delta in deltas(merged).items():
        assert lora.ranks(merged)[path] == svd_rank
        singular = np.linalg.svd(delta, compute_uv=False)
        assert (singular[svd_rank:] <= 1e-4 * (1 + singular[0])).all()


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_adds_nothing_where_it_has_no_target(method):
    """Adapters of different layers merge over the union of their targets (PEFT's rule for a
    module an adapter does not adapt): the same as merging with explicit zero factors there."""
    partial = make_adapter(1, shapes={QUERY: SHAPES[QUERY]})
    zeros = {
        path: {k: jnp.zeros_like(v) for k, v in node.items()}
        for path, node in lora.target_items(ADAPTERS[0])
        if path != QUERY
    }
    explicit = partial
    for path, node in zeros.items():
        explicit = lora.set_at(explicit, path, node)
    params = {"density": 0.5} if "density" in merging.METHODS[method].params else {}
    got = merging.merge([ADAPTERS[0], partial], method, key=KEY, **params)
    want = merging.merge([ADAPTERS[0], explicit], method, key=KEY, **params)
    for a, b in zip(jax.tree.leaves(deltas(got)), jax.tree.leaves(deltas(want))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if method == "cat":  # closed form where `partial` has no target: adapter 0's update alone
        for path in zeros:
            np.testing.assert_allclose(
                deltas(got)[path], deltas(ADAPTERS[0])[path], rtol=1e-6, atol=1e-6
            )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "params", "field"),
    [
        ((ADAPTERS, "nope"), {}, "method: got 'nope'; allowed: one of \\['breadcrumbs'"),
        (([], "linear"), {}, "adapters"),
        (([ADAPTERS[0], make_adapter(1, ranks=4)], "linear"), {}, "rank 4.*equal ranks"),
        (([ADAPTERS[0], make_adapter(1, ranks=4)], "ties"), {"density": 0.5}, "equal ranks"),
        (([ADAPTERS[0], make_adapter(1, ranks=4)], "dare_ties"), {"density": 0.5}, "equal ranks"),
        (([ADAPTERS[0], make_adapter(1, ranks=4)], "magnitude_prune"), {"density": 0.5}, "equal"),
        (
            ([ADAPTERS[0], make_adapter(1, shapes={**SHAPES, QUERY: (10, 9)})], "svd"),
            {},
            "base shape",
        ),
        (([ADAPTERS[0], lora.delta_weights(ADAPTERS[1])], "cat"), {}, "adapters\\[1\\].*keys"),
        ((ADAPTERS, "linear", [1.0, 2.0]), {}, "weights: got shape \\(2,\\)"),
        ((ADAPTERS, "ties"), {"density": 0.0}, "density: got 0.0; allowed: a number in \\(0, 1\\]"),
        ((ADAPTERS, "ties_delta"), {"density": 1.5}, "density: got 1.5"),
        ((ADAPTERS, "ties"), {}, "density: method 'ties' needs density"),
        (
            (ADAPTERS, "ties"),
            {"density": 0.5, "majority_sign_method": "mean"},
            "majority_sign_method",
        ),
        ((ADAPTERS, "dare_linear"), {"density": 0.5}, "key: method 'dare_linear'"),
        ((ADAPTERS, "dare_delta"), {}, "key:"),
        ((ADAPTERS, "svd"), {"density": 0.5}, "unknown parameter\\(s\\) \\['density'\\]"),
        ((ADAPTERS, "svd"), {"svd_rank": 0}, "svd_rank: got 0"),
        ((ADAPTERS, "svd"), {"svd_clamp": 1.5}, "svd_clamp: got 1.5"),
        ((ADAPTERS, "task_arithmetic"), {"output": "dense"}, "output: got 'dense'"),
        ((ADAPTERS, "knots"), {"combine": "mean"}, "combine: got 'mean'"),
        ((ADAPTERS, "breadcrumbs"), {"density": 0.95, "gamma": 0.1}, "gamma \\+ density"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_field(args, params, field):
    with pytest.raises(ValueError, match=field):
        merging.merge(*args, **params)
