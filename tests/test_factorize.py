"""`factorize.top_svds` against float64 LAPACK, on every path it can take.

The matrices are what PEFT's dense `*_svd` methods factor: combinations of pruned LoRA deltas
(full rank, with a leading low-rank part), plus the cases that defeat subspace iteration (a flat
spectrum), exactly low-rank and zero matrices, tall matrices and mixed shapes. Width 256 with
three rank-8 adapters keeps the iterative path in use (block 24, at most a quarter of 256).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import merging
from jaxmerge.merging import factorize as fz
from jaxmerge.merging import ops as mu

WIDTH, RANK, TASKS = 256, 8, 3
WEIGHTS = jnp.asarray([0.5, 0.3, 0.2])


def lora_deltas(seed: int, shape=(WIDTH, WIDTH)):
    """(TASKS, in, out) deltas a_i @ b_i and the stacked a_i (in, TASKS * RANK)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((TASKS, shape[0], RANK)) / np.sqrt(shape[0])
    b = rng.standard_normal((TASKS, RANK, shape[1])) * 0.01
    deltas = jnp.asarray(a @ b, jnp.float32)
    return deltas, jnp.asarray(np.concatenate(list(a), 1), jnp.float32)


def combine(kind: str, deltas: jax.Array) -> jax.Array:
    bits = jax.random.bits(jax.random.key(1), (deltas.size,), jnp.uint32)
    if kind == "magnitude_prune":
        return mu.weighted_sum(mu.magnitude_prune(deltas, 0.5), WEIGHTS)
    if kind == "ties":
        return mu.ties_combine(mu.magnitude_prune(deltas, 0.5), WEIGHTS, "total")
    if kind == "dare_linear":
        return mu.weighted_sum(mu.random_prune(bits, deltas, 0.5), WEIGHTS)
    assert kind == "dare_flat"  # so few entries kept that the spectrum is flat
    return mu.weighted_sum(mu.random_prune(bits, deltas, 0.02), WEIGHTS)


def truncated(matrix, rank: int) -> np.ndarray:
    """The rank-r truncation of `matrix` by a float64 LAPACK SVD."""
    u, s, vh = np.linalg.svd(np.asarray(matrix, np.float64))
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def assert_matches(triplet, matrix, rank: int, tol: float = 3e-5):
    u, s, vh = (np.asarray(x, np.float64) for x in triplet)
    want = truncated(matrix, rank)
    scale = np.abs(want).max() if np.abs(want).max() > 0 else 1.0
    np.testing.assert_array_less(np.abs((u * s) @ vh - want).max() / scale, tol)
    kept = int(np.sum(s > 1e-3 * s[0])) if s[0] > 0 else 0
    np.testing.assert_allclose(u[:, :kept].T @ u[:, :kept], np.eye(kept), atol=1e-5)
    np.testing.assert_allclose(vh[:kept] @ vh[:kept].T, np.eye(kept), atol=1e-5)
    assert np.all(np.diff(s) <= 1e-6 * max(s[0], 1e-30)), "singular values must descend"


@pytest.mark.parametrize(
    "kind",  # magnitude_prune, the longest, in CI's own step: keeps the README's suite short
    [pytest.param("magnitude_prune", marks=pytest.mark.slow), "ties", "dare_linear"],
)
def test_pruned_lora_deltas_converge_on_the_fast_path(kind):
    deltas, start = lora_deltas(0)
    matrix = combine(kind, deltas)
    q0 = jnp.linalg.qr(start[None])[0]
    _, _, converged = fz._power_iterate(matrix[None], q0, RANK, fz.TOLERANCE, fz.POWER_STEPS)
    assert bool(converged), "pruned LoRA deltas should not need the fallbacks"
    [triplet] = jax.jit(lambda m, s: fz.top_svds([m], [s], RANK))(matrix, start)
    assert_matches(triplet, matrix, RANK)


def test_flat_spectrum_falls_back_and_stays_exact():
    deltas, start = lora_deltas(1)
    matrix = combine("dare_flat", deltas)
    q0 = jnp.linalg.qr(start[None])[0]
    _, _, converged = fz._power_iterate(matrix[None], q0, RANK, fz.TOLERANCE, fz.POWER_STEPS)
    assert not bool(converged), "this case is meant to exercise the fallbacks"
    [triplet] = fz.top_svds([matrix], [start], RANK)
    assert_matches(triplet, matrix, RANK)


@pytest.mark.parametrize("path", ["eigen_start", "dense"])
def test_each_fallback_alone_is_exact(path):
    deltas, start = lora_deltas(2)
    matrix = combine("ties", deltas)
    # steps=0 goes straight to the eigenvectors of M M^T; tol=0 can never pass, so LAPACK.
    steps, tol = (0, fz.TOLERANCE) if path == "eigen_start" else (fz.POWER_STEPS, 0.0)
    u, s, vh = fz._top_svd_batch(matrix[None], start[None], RANK, tol, steps)
    assert_matches((u[0], s[0], vh[0]), matrix, RANK)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_low_rank_zero_tall_and_mixed_shapes_in_one_call():
    deltas, start = lora_deltas(3)
    low_rank = deltas[0, :, :] * 2.0  # rank 8 exactly: the next singular values are zero
    zero = jnp.zeros((WIDTH, WIDTH))
    tall, tall_start = lora_deltas(4, shape=(WIDTH, 160))
    tall = combine("ties", tall)
    small, small_start = lora_deltas(5, shape=(40, 24))  # too small to iterate: LAPACK
    small = combine("ties", small)
    matrices = [low_rank, zero, tall, small]
    starts = [start, start, tall_start, small_start]
    results = fz.top_svds(matrices, starts, 2 * RANK)
    for matrix, triplet in zip(matrices, results):
        assert all(np.isfinite(np.asarray(x)).all() for x in triplet)
        assert_matches(triplet, matrix, 2 * RANK)
    assert results[3][1].shape == (2 * RANK,)
    assert float(jnp.abs(results[1][1]).max()) == 0.0


def test_dense_svd_merges_match_float64_truncation():
    """`ties_svd` and `ties_delta(output="factored")` at width 256 go through `top_svds`."""
    rng = np.random.default_rng(6)
    factors = [
        (rng.standard_normal((WIDTH, RANK)) / 16, rng.standard_normal((RANK, WIDTH)) / 100)
        for _ in range(TASKS)
    ]
    adapters = [
        {"q": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32),
               "scale": jnp.float32(2.0)}}
        for a, b in factors
    ]  # fmt: skip
    deltas = jnp.stack([2.0 * jnp.asarray(a @ b, jnp.float32) for a, b in factors])
    weights = [float(w) for w in WEIGHTS]
    ties_svd = merging.merge(adapters, "ties_svd", weights, density=0.5)["q"]
    peft_ties = mu.ties_combine(mu.magnitude_prune(deltas, 0.5), WEIGHTS, "total")
    ties_delta = merging.merge(adapters, "ties_delta", weights, density=0.5, output="factored")["q"]
    dense_ties = merging.merge(adapters, "ties_delta", weights, density=0.5)["q"]["delta"]
    for node, dense in [(ties_svd, peft_ties), (ties_delta, dense_ties)]:
        got = np.asarray(node["lora_a"] @ node["lora_b"], np.float64)
        want = truncated(dense, RANK)
        assert np.abs(got - want).max() / np.abs(want).max() < 3e-5


def low_rank_pairs(seed: int, duplicate: bool = False, zero_b: bool = False):
    """Stacked-factor pairs (a (in, R), b (R, out)) of the shapes a merge meets."""
    rng = np.random.default_rng(seed)
    pairs = []
    for shape, width in [((WIDTH, WIDTH), 3 * RANK), ((WIDTH, 160), 2 * RANK), ((96, 64), 5)]:
        a = rng.standard_normal((shape[0], width)) / np.sqrt(shape[0])
        b = rng.standard_normal((width, shape[1])) * 0.01
        if duplicate:  # the same adapter merged twice: a has repeated columns
            a[:, width // 2 :] = a[:, : width - width // 2]
        if zero_b:  # freshly initialised adapters: B = 0
            b[:] = 0.0
        pairs.append((jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    return pairs


@pytest.mark.parametrize("case", ["generic", "duplicate", "zero_b"])
def test_thin_svds_match_float64_truncation(case):
    pairs = low_rank_pairs(7, duplicate=case == "duplicate", zero_b=case == "zero_b")
    results = jax.jit(lambda p: fz.thin_svds(p, RANK))(pairs)
    for (a, b), triplet in zip(pairs, results):
        assert triplet[1].shape == (min(RANK, a.shape[1]),)
        assert_matches(triplet, np.asarray(a, np.float64) @ np.asarray(b, np.float64), RANK)


def test_thin_svd_routes_agree_and_the_check_rejects_bad_triplets():
    pairs = low_rank_pairs(8)
    a = jnp.stack([jnp.pad(p[0], ((0, 0), (0, 3 * RANK - p[0].shape[1]))) for p in pairs[:1]])
    bt = jnp.stack([jnp.pad(p[1].T, ((0, 0), (0, 3 * RANK - p[1].shape[0]))) for p in pairs[:1]])
    cholesky = fz._cholesky_thin_svd(a, bt, RANK)
    householder = fz._householder_thin_svd(a, bt, RANK)
    assert bool(fz._verified(a, bt, *cholesky, fz.TOLERANCE))
    assert bool(fz._verified(a, bt, *householder, fz.TOLERANCE))
    np.testing.assert_allclose(cholesky[1], householder[1], rtol=1e-5)
    u, s, vh = cholesky
    assert not bool(fz._verified(a, bt, u, s * 1.001, vh, fz.TOLERANCE))  # wrong values
    assert not bool(fz._verified(a, bt, u[..., ::-1], s, vh, fz.TOLERANCE))  # mismatched pairs


def test_zero_padded_columns_keep_the_cholesky_route():
    """Lower ranks are padded with zero columns of `a` (and zero rows of `b`): the unit pivots
    keep the Cholesky route exact there, with no fallback."""
    a, b = low_rank_pairs(9)[1]  # (768, 2R) and (2R, 160), padded to width 3R and 768 rows
    a = jnp.pad(a, ((0, 0), (0, RANK)))[None]
    bt = jnp.pad(b.T, ((0, WIDTH - b.shape[1]), (0, RANK)))[None]
    u, s, vh = fz._cholesky_thin_svd(a, bt, RANK)
    assert bool(fz._verified(a, bt, u, s, vh, fz.TOLERANCE))
    product = np.asarray(a[0], np.float64) @ np.asarray(bt[0], np.float64).T
    assert_matches((u[0], s[0], vh[0]), product, RANK)


def test_repeated_columns_can_fail_the_cholesky_route_and_fall_back():
    """The `duplicate` case above includes this pair, so its batch is factored by Householder."""
    a, b = low_rank_pairs(7, duplicate=True)[2]
    cholesky = fz._cholesky_thin_svd(a[None], b.T[None], RANK)
    assert not bool(fz._verified(a[None], b.T[None], *cholesky, fz.TOLERANCE))


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_shape_groups_run_one_at_a_time_without_deadlock():
    """Two batched groups (q/v-like and MLP-like shapes) in one jitted merge. Run concurrently,
    their LAPACK kernels deadlocked XLA's 2-thread pool; a hang here fails after 120 s."""
    script = """
import jax, jax.numpy as jnp, numpy as np
from jaxmerge.merging import factorize as fz
rng = np.random.default_rng(0)
mats, starts = [], []
for shape in [(768, 768)] * 2 + [(768, 1536)] * 2:  # smaller shapes did not deadlock
    a = rng.standard_normal((shape[0], 48)).astype(np.float32)
    mats.append(jnp.asarray(a @ rng.standard_normal((48, shape[1])).astype(np.float32)))
    starts.append(jnp.asarray(a))
out = jax.jit(lambda m, s: fz.top_svds(m, s, 8))(mats, starts)
print(float(sum(t[1].sum() for t in out)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
