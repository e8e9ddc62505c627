"""SVD factorisations behind the merge methods; every function is pure and traces under `jit`.

* `thin_svd`, `thin_svds`: the exact SVD of a low-rank product `a @ b` from QRs of its factors,
  never forming the (in, out) matrix (PEFT's `svd` method).
* `top_svds`: the leading singular triplets of dense matrices. PEFT's other `*_svd` methods prune
  dense deltas, which makes them full rank, and then keep only r triplets of a full LAPACK SVD;
  subspace iteration from the merged factors' span finds those r triplets to a tested residual
  for a tenth of the cost at d = 768, and falls back to exact methods when it does not converge.
* `truncate`, `canonical_signs`, `clamp_factors`: triplets to LoRA factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge.merge_utils import matmul

# Converged when every kept pair's Gram residual |M M^T u - s^2 u| <= TOLERANCE * s_1^2. The
# float32 floor is about 1e-6; the leading-r product then agrees with LAPACK's to about 1e-5
# of its largest entry (tests/test_factorize.py), ten times inside the parity tolerance.
TOLERANCE = 1e-5
# Power steps from the start basis before switching to the eigenvectors of M M^T. Pruned
# LoRA deltas converge in 2 to 6; a flat spectrum (DARE at low density) can need 30 or more.
POWER_STEPS = 8


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------- low-rank products


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
    calls for 24 targets cost 4x more here. (Two independent batched QR calls in one jitted
    program hung XLA:CPU in jax 0.10.2, which is another reason for a single stacked QR.)
    """
    dim = max(max(a.shape[0], b.shape[1]) for a, b in pairs)
    rank = max(a.shape[1] for a, _ in pairs)
    pad = lambda m: jnp.pad(m, ((0, dim - m.shape[0]), (0, rank - m.shape[1])))  # noqa: E731
    q, r = jnp.linalg.qr(jnp.stack([pad(a) for a, _ in pairs] + [pad(b.T) for _, b in pairs]))
    n = len(pairs)
    uc, s, vc = jnp.linalg.svd(matmul(r[:n], _swap(r[n:])), full_matrices=False)
    u, vh = matmul(q[:n], uc), matmul(vc, _swap(q[n:]))
    # Each pair keeps its own R triplets (the rest are the padding's zeros).
    return [
        (u[i, : a.shape[0], : a.shape[1]], s[i, : a.shape[1]], vh[i, : a.shape[1], : b.shape[1]])
        for i, (a, b) in enumerate(pairs)
    ]


# ----------------------------------------------------------------------------- dense matrices


def dense_svd(delta: jax.Array):
    """Reduced SVD of a dense (in, out) matrix (LAPACK)."""
    return jnp.linalg.svd(delta, full_matrices=False)


def _gram_ritz(m, q):
    """Rayleigh-Ritz of `M M^T` on the span of orthonormal `q` (..., n, k).

    Returns `z = M^T q`, `y = M z` (the next power step), the Ritz values `lam` (ascending)
    and each Ritz pair's residual `|M M^T q w_j - lam_j q w_j|`, `w` the eigenvectors of
    `z^T z`: the convergence test costs k x k work on top of the power step.
    """
    z = matmul(_swap(m), q)
    y = matmul(m, z)
    lam, w = jnp.linalg.eigh(matmul(_swap(z), z))
    residual = jnp.linalg.norm(matmul(y, w) - lam[..., None, :] * matmul(q, w), axis=-2)
    return z, y, lam, residual


def _converged(lam, residual, rank, tol):
    """Whether the `rank` largest Ritz pairs of every matrix in the batch have converged."""
    return jnp.all(residual[..., -rank:] <= tol * lam[..., -1:])


def _power_iterate(m, q, rank, tol, steps):
    """Up to `steps` orthonormalised power steps `q <- qr(M M^T q)` until `_converged`."""

    def keep_going(state):
        _, _, _, lam, residual, step = state
        return ~_converged(lam, residual, rank, tol) & (step < steps)

    def power_step(state):
        _, _, y, _, _, step = state
        q, _ = jnp.linalg.qr(y)
        return (q, *_gram_ritz(m, q), step + 1)

    q, z, _, lam, residual, _ = jax.lax.while_loop(
        keep_going, power_step, (q, *_gram_ritz(m, q), 0)
    )
    return q, z, _converged(lam, residual, rank, tol)


def _ritz_svd(q, z, rank):
    """The leading triplets of `M` restricted to span(q), from `z = M^T q` = Qz Rz, Rz = ur s vr:
    `q^T M = vr^T s ur^T Qz^T`, so `u = q vr^T`, `vh = (Qz ur)^T` (an SVD of `z`, not its Gram
    matrix, so small singular values keep full precision)."""
    qz, rz = jnp.linalg.qr(z)
    ur, s, vr = jnp.linalg.svd(rz, full_matrices=False)
    return matmul(q, _swap(vr))[..., :rank], s[..., :rank], _swap(matmul(qz, ur))[..., :rank, :]


def _top_svd_batch(m, start, rank, tol, steps):
    """Leading `rank` triplets of each (n, p) matrix in `m` (b, n, p), n <= p, from `start`."""
    n, p = m.shape[-2:]
    block = max(start.shape[-1], 2 * rank)  # oversampling: convergence goes as s_{block+1}/s_rank
    if 4 * block > n:  # too small for iteration to pay: LAPACK on the whole matrix
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if start.shape[-1] < block:  # widen with a fixed Gaussian sketch of M's column space
        sketch = jax.random.normal(jax.random.key(0), (p, block - start.shape[-1]), m.dtype)
        start = jnp.concatenate([start, matmul(m, sketch)], -1)
    q, z, done = _power_iterate(m, jnp.linalg.qr(start)[0], rank, tol, steps)

    def eigen_start():  # the leading eigenvectors of M M^T: one LAPACK eigh, half an SVD's cost
        q = jnp.linalg.eigh(matmul(m, _swap(m)))[1][..., -block:]
        return _power_iterate(m, q, rank, tol, 2)

    q, z, done = jax.lax.cond(done, lambda: (q, z, done), eigen_start)

    def dense():
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]

    return jax.lax.cond(done, lambda: _ritz_svd(q, z, rank), dense)


def top_svds(matrices, starts, rank: int, *, tol: float = TOLERANCE, steps: int = POWER_STEPS):
    """The leading `min(rank, in, out)` singular triplets of each dense (in, out) matrix.

    Args:
      matrices: (in, out) arrays.
      starts: one (in, K) array per matrix whose span is close to its leading column space (the
        merged adapters' stacked `lora_a`); any basis works, a close one converges faster.
      rank: how many triplets to keep.
      tol: convergence test, `|M M^T u_j - s_j^2 u_j| <= tol * s_1^2` for every kept pair.
      steps: power steps before restarting from the eigenvectors of `M M^T`; if those do not
        converge either, the result is LAPACK's full SVD, so it is never worse than `tol`.

    Returns:
      One `(u (in, k), s (k,), vh (k, out))` per matrix, `s` descending. Matrices of one shape
      share one batched computation and one convergence decision.
    """
    groups: dict[tuple, list[int]] = {}
    for index, (m, start) in enumerate(zip(matrices, starts)):
        groups.setdefault((m.shape, start.shape), []).append(index)
    results = [None] * len(matrices)
    for indices in groups.values():
        m = jnp.stack([matrices[i] for i in indices])
        start = jnp.stack([starts[i] for i in indices])
        if m.shape[-2] > m.shape[-1]:  # iterate on the smaller Gram matrix: factor M^T
            vt, s, ut = _top_svd_batch(_swap(m), matmul(_swap(m), start), rank, tol, steps)
            u, vh = _swap(ut), _swap(vt)
        else:
            u, s, vh = _top_svd_batch(m, start, rank, tol, steps)
        for j, i in enumerate(indices):
            results[i] = (u[j], s[j], vh[j])
    return results


# ----------------------------------------------------------------------------- to LoRA factors
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


def clamp_factors(a: jax.Array, b: jax.Array, quantile: float):
    """PEFT's `svd_clamp`: clip both factors to [-h, h], h the `quantile` of all their entries.

    The quantile is taken over the signed values of `concat(a.ravel(), b.ravel())` with linear
    interpolation, as `torch.quantile` does.
    """
    high = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), quantile)
    return jnp.clip(a, -high, high), jnp.clip(b, -high, high)
