"""Array maths behind the merge methods: pruning, sign election, disjoint means (SVDs: `factorize`).

Every function here is pure and shape-static, so it traces under `jax.jit`; integer counts such
as `k = int(density * size)` come from Python floats that the caller keeps static. Task tensors
are stacked on axis 0: `tensors` has shape (n, ...) for n tasks.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge.merging.threefry import uniform_threshold

HIGHEST = jax.lax.Precision.HIGHEST
# Entries selected in one loop by `magnitude_prune_each` (64 MB of float32).
SELECTION_BATCH = 2**24


def matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x @ y` at full float32 precision (TPUs otherwise multiply in bfloat16 passes)."""
    return jnp.matmul(x, y, precision=HIGHEST)


def task_sum(tensors: jax.Array) -> jax.Array:
    """`tensors.sum(0)` over the short leading task axis, written as a chain of adds.

    XLA:CPU in jax 0.10 turns a reduce over a leading axis of 3 into a kernel that took 5 ms
    for (3, 768, 768), against 0.12 ms for the adds (which fuse with their producers).
    """
    return functools.reduce(operator.add, [tensors[i] for i in range(tensors.shape[0])])


def weighted_sum(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """`sum_i w_i t_i` over the leading task axis."""
    return task_sum(tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1)))


# ----------------------------------------------------------------------------- pruning


def kth_largest(magnitude: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry (k >= 1) of a non-negative float32 array, without sorting."""
    return kth_largest_rows(magnitude.reshape(1, -1), k)[0]


def kth_largest_rows(rows: jax.Array, k: int) -> jax.Array:
    """(m,): the k-th largest entry (k >= 1) of each row of a non-negative (m, N) array.

    Non-negative floats order like their int32 bit patterns, so each answer's bits are built
    greedily from the top bit down: a group of bits takes the largest value `j` for which at
    least k entries are >= the candidate `found | j`. Counting against the 7 candidates of a
    3-bit group is one variadic reduction, which XLA:CPU fuses with the comparisons into one
    read of the rows: 11 passes (bit 30 down to bit 0), against 31 passes of one bit, whose
    single count XLA:CPU writes out as an (m, N) array before summing it. Every answer is the
    same integer as the bit-at-a-time search's. All rows share one loop: PEFT's factor-space
    merges select 144 small tensors (benchmarks/RESULTS.md, issue 23).
    """
    bits = jax.lax.bitcast_convert_type(rows.astype(jnp.float32), jnp.int32)

    def counts(candidates):
        at_least = tuple(jnp.where(bits >= c[:, None], 1, 0) for c in candidates)
        zeros = tuple(jnp.int32(0) for _ in candidates)
        return jax.lax.reduce(at_least, zeros, lambda x, y: tuple(map(operator.add, x, y)), (1,))

    def decide(found, low_bit, width):
        steps = [j << low_bit for j in range(1, 2**width)]
        # Width 1 still counts 3 candidates (two repeats): a single count is the slow kind.
        steps += steps[-1:] * max(0, 3 - len(steps))
        enough = [count >= k for count in counts([found | step for step in steps])]
        chosen = functools.reduce(
            lambda best, pair: jnp.where(pair[0], pair[1], best),
            zip(enough, steps),
            jnp.zeros_like(found),
        )
        return found | chosen

    found = jax.lax.fori_loop(
        0,
        10,
        lambda group, found: decide(found, 28 - 3 * group, 3),  # bits 30..28, ..., 3..1
        jnp.zeros(rows.shape[0], jnp.int32),
    )
    found = decide(found, 0, 1)  # bit 0
    return jax.lax.bitcast_convert_type(found, jnp.float32)


def top_magnitude_mask(tensor: jax.Array, density: float) -> jax.Array:
    """Bool mask of the `k = int(density * size)` entries of largest |value|.

    Selects `|t| >= t_(k)`, the k-th largest magnitude. This equals PEFT's `torch.topk` selection
    unless two nonzero entries tie at the threshold; tied zeros are harmless because a zero adds
    nothing to a sum and its sign (0) never joins a sign election.
    """
    return _top_magnitude_masks(tensor[None], density)[0]


def _top_magnitude_masks(tensors: jax.Array, density: float) -> jax.Array:
    """`top_magnitude_mask` of each `tensors[i]`, selected in one loop."""
    if density >= 1.0:
        return jnp.ones(tensors.shape, bool)
    k = int(density * tensors[0].size)
    if k == 0:
        return jnp.zeros(tensors.shape, bool)
    magnitude = jnp.abs(tensors).astype(jnp.float32)
    threshold = kth_largest_rows(magnitude.reshape(tensors.shape[0], -1), k)
    return magnitude >= threshold.reshape((-1,) + (1,) * (tensors.ndim - 1))


def magnitude_band_mask(tensor: jax.Array, density: float, gamma: float) -> jax.Array:
    """Bool mask that drops the `int(gamma * size)` largest |values| and keeps the next
    `int(density * size)`; everything smaller is dropped too (Model Breadcrumbs)."""
    n = tensor.size
    n_top, n_keep = int(gamma * n), int(density * n)
    n_keep = min(n_keep, n - n_top)
    if n_keep == 0:
        return jnp.zeros(tensor.shape, bool)
    magnitude = jnp.abs(tensor).astype(jnp.float32)
    keep = magnitude >= kth_largest(magnitude, n_top + n_keep)
    if n_top > 0:
        keep &= magnitude < kth_largest(magnitude, n_top)
    return keep


def magnitude_prune(tensors: jax.Array, density: float) -> jax.Array:
    """Each task tensor with all but its top-`density` fraction of magnitudes set to zero."""
    return magnitude_prune_each([tensors], density)[0]


def magnitude_prune_each(stacks: Sequence[jax.Array], density: float) -> list[jax.Array]:
    """`magnitude_prune` of every (n, ...) stack, the stacks of equal task size selected in
    one loop (the same masks as one stack at a time), up to `SELECTION_BATCH` entries a loop:
    the loop holds copies of its rows, so big adapters take several loops, not gigabytes."""
    groups: dict[int, list[list[int]]] = {}
    for index, stack in enumerate(stacks):
        batches = groups.setdefault(stack[0].size, [[]])
        if batches[-1] and sum(stacks[i].size for i in batches[-1]) + stack.size > SELECTION_BATCH:
            batches.append([])
        batches[-1].append(index)
    out: list = [None] * len(stacks)
    for indices in (batch for batches in groups.values() for batch in batches):
        rows = jnp.concatenate([stacks[i].reshape(stacks[i].shape[0], -1) for i in indices])
        masks = _top_magnitude_masks(rows, density)
        start = 0
        for i in indices:
            count = stacks[i].shape[0]
            out[i] = stacks[i] * masks[start : start + count].reshape(stacks[i].shape)
            start += count
    return out


def random_prune(bits: jax.Array, tensors: jax.Array, density: float) -> jax.Array:
    """DARE's drop-and-rescale: `t * m / density`, `m = [u < density]` a Bernoulli(density) mask.

    `bits` holds at least tensors.size uint32 draws (`jax.random.bits`; the caller draws them
    for all targets at once) and `u` is `jax.random.uniform`'s U[0, 1) number of each draw
    (`m / 2^23` of its top 23 bits), so the keep probability is `density` rounded up to a
    multiple of 2^-23; the mask is compared on the integers (`threefry.uniform_threshold`).
    The rescale is by `1 / density` exactly, as in PEFT.

    E[result] = t (to that rounding), so a weighted sum of pruned tensors is unbiased.
    density >= 1 keeps all.
    """
    if density >= 1.0:
        return tensors
    threshold = uniform_threshold(density)
    bits = bits[: tensors.size].reshape(tensors.shape)
    keep = bits < jnp.uint32(threshold) if threshold < 2**32 else jnp.ones(tensors.shape, bool)
    return jnp.where(keep, tensors / density, jnp.zeros_like(tensors))


# ----------------------------------------------------------------------------- TIES pieces


def majority_sign_mask(tensors: jax.Array, method: str) -> jax.Array:
    """Bool (n, ...) mask of the entries whose sign equals the elected sign.

    The elected sign is `+1 where s >= 0 else -1` with `s = sum_i t_i` ("total", the summed
    mass) or `s = sum_i sign(t_i)` ("frequency", a vote). Zeros never agree.
    """
    signs = jnp.sign(tensors)
    mass = task_sum(tensors) if method == "total" else task_sum(signs)
    return signs == jnp.where(mass >= 0, 1.0, -1.0).astype(tensors.dtype)


def disjoint_mean(tensors: jax.Array, mask: jax.Array) -> jax.Array:
    """`sum_i t_i m_i / max(1, sum_i m_i)`: the mean over the entries that agree."""
    total = task_sum(jnp.where(mask, tensors, 0))
    return total / jnp.maximum(task_sum(mask.astype(tensors.dtype)), 1)


def ties_combine(tensors: jax.Array, weights: jax.Array, method: str) -> jax.Array:
    """PEFT's TIES combination of already-trimmed tensors: signs are elected on the unweighted
    tensors, the disjoint mean is taken of the weighted ones."""
    mask = majority_sign_mask(tensors, method)
    weighted = tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1))
    return disjoint_mean(weighted, mask)
