"""Array maths behind `merge.py`: pruning, sign election, disjoint means and low-rank SVDs.

Every function here is pure and shape-static, so it traces under `jax.jit`; integer counts such
as `k = int(density * size)` come from Python floats that the caller keeps static. Task tensors
are stacked on axis 0: `tensors` has shape (n, ...) for n tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """`x @ y` at full float32 precision (TPUs otherwise multiply in bfloat16 passes)."""
    return jnp.matmul(x, y, precision=HIGHEST)


def weighted_sum(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """`sum_i w_i t_i` over the leading task axis."""
    return jnp.tensordot(weights, tensors, axes=1, precision=HIGHEST)


# ----------------------------------------------------------------------------- pruning


def kth_largest(magnitude: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry (k >= 1) of a non-negative float32 array, without sorting.

    Non-negative floats order like their int32 bit patterns, so the answer's bits are built
    greedily from the top bit down: keep a bit when at least k entries are >= the candidate.
    31 passes of compare-and-count, which on CPU is far cheaper than sorting d x d entries.
    """
    bits = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32), jnp.int32).ravel()

    def step(bit, found):
        candidate = found | jnp.left_shift(jnp.int32(1), 30 - bit)
        return jnp.where((bits >= candidate).sum() >= k, candidate, found)

    found = jax.lax.fori_loop(0, 31, step, jnp.int32(0))
    return jax.lax.bitcast_convert_type(found, jnp.float32)


def top_magnitude_mask(tensor: jax.Array, density: float) -> jax.Array:
    """Bool mask of the `k = int(density * size)` entries of largest |value|.

    Selects `|t| >= t_(k)`, the k-th largest magnitude. This equals PEFT's `torch.topk` selection
    unless two nonzero entries tie at the threshold; tied zeros are harmless because a zero adds
    nothing to a sum and its sign (0) never joins a sign election.
    """
    if density >= 1.0:
        return jnp.ones(tensor.shape, bool)
    k = int(density * tensor.size)
    if k == 0:
        return jnp.zeros(tensor.shape, bool)
    magnitude = jnp.abs(tensor).astype(jnp.float32)
    return magnitude >= kth_largest(magnitude, k)


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
    return jnp.stack([t * top_magnitude_mask(t, density) for t in tensors])


def random_prune(uniform: jax.Array, tensors: jax.Array, density: float) -> jax.Array:
    """DARE's drop-and-rescale: `t * m / density`, `m = [u < density]` a Bernoulli(density) mask
    from `uniform`, tensors.size draws of U[0, 1) (the caller draws them for all targets at once:
    one threefry call compiles far faster than one per target).

    E[result] = t, so a weighted sum of pruned tensors is unbiased. density >= 1 keeps all.
    """
    if density >= 1.0:
        return tensors
    keep = uniform[: tensors.size].reshape(tensors.shape) < density
    return jnp.where(keep, tensors / density, jnp.zeros_like(tensors))


# ----------------------------------------------------------------------------- TIES pieces


def majority_sign_mask(tensors: jax.Array, method: str) -> jax.Array:
    """Bool (n, ...) mask of the entries whose sign equals the elected sign.

    The elected sign is `+1 where s >= 0 else -1` with `s = sum_i t_i` ("total", the summed
    mass) or `s = sum_i sign(t_i)` ("frequency", a vote). Zeros never agree.
    """
    signs = jnp.sign(tensors)
    mass = tensors.sum(0) if method == "total" else signs.sum(0)
    return signs == jnp.where(mass >= 0, 1.0, -1.0).astype(tensors.dtype)


def disjoint_mean(tensors: jax.Array, mask: jax.Array) -> jax.Array:
    """`sum_i t_i m_i / max(1, sum_i m_i)`: the mean over the entries that agree."""
    total = jnp.where(mask, tensors, 0).sum(0)
    return total / jnp.maximum(mask.sum(0), 1).astype(tensors.dtype)


def ties_combine(tensors: jax.Array, weights: jax.Array, method: str) -> jax.Array:
    """PEFT's TIES combination of already-trimmed tensors: signs are elected on the unweighted
    tensors, the disjoint mean is taken of the weighted ones."""
    mask = majority_sign_mask(tensors, method)
    weighted = tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1))
    return disjoint_mean(weighted, mask)


# ----------------------------------------------------------------------------- SVD


def canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips each singular pair (u[:, k], vh[k]) so that the largest-|.| entry of u[:, k] is > 0.

    SVD routines return arbitrary signs per pair; fixing them makes results reproducible across
    backends and between the thin and the dense factorisation (`u s vh` is unchanged).
    """
    rows = jnp.argmax(jnp.abs(u), axis=0)
    signs = jnp.sign(u[rows, jnp.arange(u.shape[1])])
    signs = jnp.where(signs == 0, 1.0, signs).astype(u.dtype)
    return u * signs, vh * signs[:, None]


def truncate(u: jax.Array, s: jax.Array, vh: jax.Array, rank: int):
    """Rank-`rank` factors `(u_r, s_r vh_r)` of an SVD, zero-padded when fewer pairs exist.

    The singular values go to the second (output-side) factor, as PEFT puts them in lora_B.
    """
    kept = min(rank, s.shape[0])
    u, vh = canonical_signs(u[:, :kept], vh[:kept])
    a, b = u, s[:kept, None] * vh
    pad = rank - kept
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad)))
        b = jnp.pad(b, ((0, pad), (0, 0)))
    return a, b


def thin_svd(a: jax.Array, b: jax.Array):
    """Exact SVD `u s vh = a @ b` of a low-rank product without forming the (in, out) matrix.

    With `a = Qa Ra` and `b^T = Qb Rb` (reduced QR), `a @ b = Qa (Ra Rb^T) Qb^T`; the SVD of the
    small core `Ra Rb^T = uc s vc` gives `u = Qa uc`, `vh = vc Qb^T`. Cost O((in + out) R^2)
    for a (in, R) and b (R, out), against O(in out min(in, out)) for a dense SVD.
    """
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b.T)
    uc, s, vc = jnp.linalg.svd(matmul(ra, rb.T), full_matrices=False)
    return matmul(qa, uc), s, matmul(vc, qb.T)


def thin_svds(pairs):
    """`thin_svd` of many `(a, b)` pairs with one batched QR and one batched SVD.

    Every factor is zero-padded to a common (d, R), which leaves each product and its nonzero
    singular triplets unchanged, so all targets share one LAPACK call of each kind: 72 small
    calls for 24 targets cost 4x more here. (Two batched QR calls in one jitted program hung
    XLA:CPU in jax 0.10.2, which is another reason for a single stacked QR.)
    """
    dim = max(max(a.shape[0], b.shape[1]) for a, b in pairs)
    rank = max(a.shape[1] for a, _ in pairs)
    pad = lambda m: jnp.pad(m, ((0, dim - m.shape[0]), (0, rank - m.shape[1])))  # noqa: E731
    q, r = jnp.linalg.qr(jnp.stack([pad(a) for a, _ in pairs] + [pad(b.T) for _, b in pairs]))
    n = len(pairs)
    uc, s, vc = jnp.linalg.svd(matmul(r[:n], jnp.swapaxes(r[n:], -1, -2)), full_matrices=False)
    u, vh = matmul(q[:n], uc), matmul(vc, jnp.swapaxes(q[n:], -1, -2))
    # Each pair keeps its own R triplets (the rest are the padding's zeros).
    return [
        (u[i, : a.shape[0], : a.shape[1]], s[i, : a.shape[1]], vh[i, : a.shape[1], : b.shape[1]])
        for i, (a, b) in enumerate(pairs)
    ]


def dense_svd(delta: jax.Array):
    """Reduced SVD of a dense (in, out) matrix."""
    return jnp.linalg.svd(delta, full_matrices=False)


def clamp_factors(a: jax.Array, b: jax.Array, quantile: float):
    """PEFT's `svd_clamp`: clip both factors to [-h, h], h the `quantile` of all their entries.

    The quantile is taken over the signed values of `concat(a.ravel(), b.ravel())` with linear
    interpolation, as `torch.quantile` does.
    """
    high = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), quantile)
    return jnp.clip(a, -high, high), jnp.clip(b, -high, high)
