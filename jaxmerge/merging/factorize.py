"""SVD factorisations behind the merge methods; every function is pure and traces under `jit`.

* `thin_svds`: the exact leading SVD of low-rank products `a @ b` from their factors, never
  forming the (in, out) matrices (PEFT's `svd` method, factored delta-space outputs).
* `top_svds`: the leading singular triplets of dense matrices. PEFT's other `*_svd` methods prune
  dense deltas, which makes them full rank, and then keep only r triplets of a full LAPACK SVD;
  subspace iteration from the merged factors' span finds those r triplets to a tested residual
  for a tenth of the cost at d = 768, and falls back to exact methods when it does not converge.
* `truncate`, `canonical_signs`, `clamp_factors`: triplets to LoRA factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge.merging.ops import matmul

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


def _householder_thin_svd(a, bt, rank):
    """Leading triplets of each `a @ bt^T` in a batch ((n, d, R) and (n, d, R)) from Householder
    QRs: with `a = Qa Ra`, `bt = Qb Rb`, `a @ bt^T = Qa (Ra Rb^T) Qb^T` and the SVD of the R x R
    core gives `u = Qa uc`, `vh = vc Qb^T`. Stable at any rank. Both factors share one stacked
    QR: two independent batched QRs in one program deadlock XLA:CPU (see `_after`)."""
    n = a.shape[0]
    q, r = jnp.linalg.qr(jnp.concatenate([a, bt]))
    uc, s, vc = jnp.linalg.svd(matmul(r[:n], _swap(r[n:])), full_matrices=False)
    return matmul(q[:n], uc[..., :rank]), s[..., :rank], matmul(vc[..., :rank, :], _swap(q[n:]))


def _cholesky_thin_svd(a, bt, rank):
    """The same triplets from R x R Gram matrices: one Cholesky, one eigh, no LAPACK call on a
    d x R matrix.

    `a^T a = L L^T` makes `Q = a L^-T` orthonormal, so `a @ bt^T = Q (L^T bt^T)`, and the
    eigenpairs `(w, s^2)` of the core `L^T (bt^T bt) L` give `u = a L^-T w`,
    `vh = (bt L w)^T / s`. Zero columns of `a` (the padding of lower ranks) get a unit pivot
    and their rows of `bt^T` are dropped, which leaves the product unchanged. Squaring costs
    precision where `a` is near rank-deficient (a repeated adapter): Cholesky then fails or
    loses digits, and `_verified` sends the batch to `_householder_thin_svd`. A Cholesky in
    place of a first eigh of `a^T a` saved 3 of the 17 ms of PEFT's `svd` on 24 ViT-B targets.
    """
    gram = matmul(_swap(a), a)
    empty = jnp.diagonal(gram, axis1=-2, axis2=-1) == 0
    gram = gram + jnp.where(empty, 1.0, 0.0)[..., None, :] * jnp.eye(gram.shape[-1], dtype=a.dtype)
    bt = jnp.where(empty[..., None, :], 0.0, bt)
    lower = jnp.linalg.cholesky(gram)
    lam, w = jnp.linalg.eigh(matmul(_swap(lower), matmul(matmul(_swap(bt), bt), lower)))
    lam, w = lam[..., ::-1][..., :rank], w[..., ::-1][..., :rank]  # descending
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    u = matmul(
        a, jax.lax.linalg.triangular_solve(lower, w, left_side=True, lower=True, transpose_a=True)
    )
    vh = _swap(matmul(bt, matmul(lower, w))) / jnp.where(s > 0, s, 1.0)[..., :, None]
    return u, s, vh


def _verified(a, bt, u, s, vh, tol):
    """Whether `(u, s, vh)` are singular triplets of every `M = a @ bt^T` to `tol * s_1`: both
    residuals `|M vh_j^T - s_j u_j|`, `|M^T u_j - s_j vh_j^T|` and the orthonormality of u and
    vh."""
    scale = jnp.maximum(s[..., :1], jnp.finfo(s.dtype).tiny)
    left = matmul(a, matmul(_swap(bt), _swap(vh))) - u * s[..., None, :]
    right = matmul(bt, matmul(_swap(a), u)) - _swap(vh) * s[..., None, :]
    residual = jnp.maximum(jnp.linalg.norm(left, axis=-2), jnp.linalg.norm(right, axis=-2))
    live = s > 0  # zero singular values carry no product; their vectors need not be checked
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    pairs = live[..., :, None] & live[..., None, :]
    u_error = jnp.where(pairs, matmul(_swap(u), u) - eye, 0.0)
    v_error = jnp.where(pairs, matmul(vh, _swap(vh)) - eye, 0.0)
    orthonormal = jnp.maximum(jnp.abs(u_error).max(), jnp.abs(v_error).max()) <= 10 * tol
    return jnp.all(residual <= tol * scale) & orthonormal


def thin_svds(pairs, rank: int, *, tol: float = TOLERANCE):
    """Leading `min(rank, R)` singular triplets of many low-rank products `a @ b`, exactly.

    Never forms the (in, out) matrices. Every factor is zero-padded to a common (d, R), which
    leaves each product and its nonzero triplets unchanged, so all targets share one batched
    computation: the Cholesky route (`_cholesky_thin_svd`), verified by residuals, else the
    Householder route (`_householder_thin_svd`). `b` is stacked transposed, (d, R) like `a`:
    XLA:CPU forms `b^T b` from it in half the time of `b b^T` from (R, d). On 24 ViT-B targets
    at R = 48 the verified Cholesky route takes about 11 ms, the QRs alone 7 ms more.

    Returns:
      One `(u (in, k), s (k,), vh (k, out))` per pair, k = min(rank, that pair's R).
    """
    dim = max(max(a.shape[0], b.shape[1]) for a, b in pairs)
    width = max(a.shape[1] for a, _ in pairs)
    rank = min(rank, width)
    a = jnp.stack([jnp.pad(a, ((0, dim - a.shape[0]), (0, width - a.shape[1]))) for a, _ in pairs])
    bt = jnp.stack(
        [jnp.pad(b.T, ((0, dim - b.shape[1]), (0, width - b.shape[0]))) for _, b in pairs]
    )
    fast = _cholesky_thin_svd(a, bt, rank)
    u, s, vh = jax.lax.cond(
        _verified(a, bt, *fast, tol),
        lambda: fast,
        lambda: _householder_thin_svd(a, bt, rank),
    )
    return [
        (u[i, : pa.shape[0], :k], s[i, :k], vh[i, :k, : pb.shape[1]])
        for i, (pa, pb) in enumerate(pairs)
        for k in [min(rank, pa.shape[1])]
    ]


# ----------------------------------------------------------------------------- dense matrices


def _lapack_top(m, rank):
    """The leading `rank` triplets from LAPACK's full SVD of each matrix (what PEFT computes)."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


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
    if 4 * block > n:  # too small for iteration to pay
        return _lapack_top(m, rank)
    if start.shape[-1] < block:  # widen with a fixed Gaussian sketch of M's column space
        sketch = jax.random.normal(jax.random.key(0), (p, block - start.shape[-1]), m.dtype)
        start = jnp.concatenate([start, matmul(m, sketch)], -1)
    q, z, done = _power_iterate(m, jnp.linalg.qr(start)[0], rank, tol, steps)

    def eigen_start():  # the leading eigenvectors of M M^T: one LAPACK eigh, half an SVD's cost
        q = jnp.linalg.eigh(matmul(m, _swap(m)))[1][..., -block:]
        return _power_iterate(m, q, rank, tol, 2)

    q, z, done = jax.lax.cond(done, lambda: (q, z, done), eigen_start)
    return jax.lax.cond(done, lambda: _ritz_svd(q, z, rank), lambda: _lapack_top(m, rank))


def _after(x: jax.Array, token: jax.Array) -> jax.Array:
    """`x`, made to wait for the scalar `token` (a singular value, never negative).

    jaxlib's batched LAPACK kernels spread their batch over XLA's thread pool and block their
    own thread until it is done. Two of them running at once on a 2-thread pool each hold one
    thread and wait for the other forever (seen at 0% CPU for the (768, 768) and (768, 3072)
    groups of ViT-B q, v and MLP targets, jax 0.10.2). Adding `[token < 0]` (always 0.0) is a
    data dependency XLA keeps; it drops `optimization_barrier` before it schedules.
    """
    return x + (token < 0).astype(x.dtype)


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
    previous = None
    for indices in groups.values():
        m = jnp.stack([matrices[i] for i in indices])
        start = jnp.stack([starts[i] for i in indices])
        if previous is not None:  # one group at a time: see `_after`
            m, start = _after(m, previous), _after(start, previous)
        if m.shape[-2] > m.shape[-1]:  # iterate on the smaller Gram matrix: factor M^T
            vt, s, ut = _top_svd_batch(_swap(m), matmul(_swap(m), start), rank, tol, steps)
            u, vh = _swap(ut), _swap(vt)
        else:
            u, s, vh = _top_svd_batch(m, start, rank, tol, steps)
        for j, i in enumerate(indices):
            results[i] = (u[j], s[j], vh[j])
        previous = s.min()
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
