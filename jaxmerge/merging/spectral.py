"""Data-free merges that rebuild the spectrum of the summed update, registered in
`merging.METHODS`: `iso_c` and `iso_cts` (Marczak et al., ICML 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces") and `tsv` (TSV-M, Gargiulo et
al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

Every task vector here is `t_i = w_i dW_i = w_i scale_i a_i @ b_i`, in jaxmerge's (in, out)
layout; FusionBench (0.2.33, `isotropic_merging.iso_utils`, `task_singular_vector.utils.
TSVM_utils.compute_and_sum_svd_mem_reduction`) works on the (out, in) transposes, which only
swaps the names of the two sides. Per-task weights scale the task vectors before the method (as
FusionBench's TSV-M does with a list of alphas), `scale` multiplies the result (FusionBench's
`scaling_factor` / `alpha`, default 1.0 there too).

All three work in the update's own span. With `[a_1 ... a_n] = Qa Ra` and `[b_1; ...; b_n]^T =
Qb Rb` (two thin QRs of the stacked factors), `t_i = Qa C_i Qb^T` with a small core `C_i` of
at most (R, R), R = sum_i r_i; every SVD, projection and polar factor below is taken of cores,
never of an (in, out) matrix, and the result is `Qa M Qb^T`. SVDs and polar factors commute
with these orthonormal bases, so wherever the spans have full rank (R >= min(in, out)) the result
is FusionBench's, which the golden tests check at 1e-4. At LoRA ranks (R < min(in, out))
FusionBench fills its subspaces with arbitrary vectors of zero singular value (LAPACK's
completion of the null space), which then take a share of the flattened spectrum or of the
polar factor; here those directions are left out: a method uses only directions of nonzero
singular value (above `RANK_RTOL` of the largest), so the result does not depend on an
arbitrary basis and lies in the span of the adapters. Repeated or linearly dependent adapters
make polar factors non-unique, in FusionBench as here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmerge.merging import factorize as fz
from jaxmerge.merging import registry as checks
from jaxmerge.merging import targets as mt
from jaxmerge.merging.ops import matmul
from jaxmerge.merging.registry import register

F32 = jnp.float32
_OUTPUT = {"scale": checks.number, "output": checks.OUTPUT, "rank": checks.rank}
# A singular value at most this fraction of its reference (the largest of the matrix it comes
# from) is round-off of a zero one: float32 projections and QRs leave about 1e-6, and generic
# full-rank inputs have none this small, so FusionBench's results are unchanged where defined.
RANK_RTOL = 1e-5


# ----------------------------------------------------------------------------- the shared span
# Targets of one layout (in, out and every task's rank) are stacked on a leading axis G and go
# through each LAPACK call together: a ViT-B's 24 q/v targets make 4 to 5 batched calls, not
# 200 small ones (compile time, and dispatch on a loaded machine). Independent batched LAPACK
# calls are chained with `fz._after`, which keeps two of them from deadlocking XLA:CPU's pool.


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _svd(x):
    """`(u, s, v)` with `x = u diag(s) v^T` for each matrix of the batch, s descending."""
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    return u, s, _swap(vh)


def _qrs(a, bt):
    """Thin QRs of `a` (G, in, R) and `bt` (G, out, R): one batched call where in == out."""
    if a.shape == bt.shape:
        q, r = jnp.linalg.qr(jnp.concatenate([a, bt]))
        n = a.shape[0]
        return q[:n], r[:n], q[n:], r[n:]
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(fz._after(bt, jnp.abs(ra[:, 0, 0]).min()))
    return qa, ra, qb, rb


def _polars(left, right):
    """The orthonormal polar factors `U V^T` of `left` and `right` (`x = U S V^T`, thin): the
    orthonormal matrices nearest to them, as FusionBench orthogonalises stacked vectors."""

    def polar(x):
        u, s, vh = jnp.linalg.svd(x, full_matrices=False)
        return matmul(u, vh), s.min()

    if left.shape == right.shape:
        both, _ = polar(jnp.concatenate([left, right]))
        return both[: left.shape[0]], both[left.shape[0] :]
    left, token = polar(left)
    return left, polar(fz._after(right, token))[0]


def _live(s, reference):
    """Which singular values are nonzero, i.e. above `RANK_RTOL * reference` (G, 1)."""
    return s > RANK_RTOL * reference


def _flat(s, live):
    """Every live singular value replaced by the mean of the live ones (per row); others 0."""
    count = jnp.maximum(live.sum(-1, keepdims=True), 1)
    return jnp.where(live, jnp.where(live, s, 0.0).sum(-1, keepdims=True) / count, 0.0)


def _task_columns(x, kept):
    """(G, n, d, m) per-task vectors -> (G, d, n * kept): the first `kept` of each, task-major."""
    g, n, d, _ = x.shape
    return jnp.swapaxes(x[..., :kept], 1, 2).reshape(g, d, n * kept)


def _rank_mask(ranks, kept):
    """(n * kept,) bool: pair j of task i exists (j < r_i; a rank-r_i task has no more)."""
    return jnp.asarray((np.arange(kept)[None, :] < np.asarray(ranks)[:, None]).ravel())


def _group_cores(group, weights, token):
    """Stacked spans and cores of G targets of one layout: `(Qa (G, in, ka), Qb (G, out, kb),
    C (G, n, ka, kb))` with `t_i = Qa C_i Qb^T`, ka = min(in, R), kb = min(out, R)."""
    factors = [mt.weighted_factors(target, weights) for target in group]
    a = jnp.stack([a for a, _ in factors])
    bt = jnp.stack([b.T for _, b in factors])
    if token is not None:
        a, bt = fz._after(a, token), fz._after(bt, token)
    qa, ra, qb, rb = _qrs(a, bt)
    cores, start = [], 0
    for node in group[0]:
        stop = start + node["lora_a"].shape[1]
        cores.append(matmul(ra[..., start:stop], _swap(rb[..., start:stop])))
        start = stop
    return qa, qb, jnp.stack(cores, 1)


def _spectral_method(adapters, weights, core_method, scale, output, rank):
    """Runs `core_method(cores (G, n, ka, kb), ranks, (in, out)) -> (u (G, ka, k), s (G, k),
    v (G, kb, k))` per layout, for merged updates `Qa u diag(scale s) v^T Qb^T`, and returns
    `output`: `{"delta": dW}` nodes, or factors of rank `rank` (default: every direction the
    method returns, so exact). `u`, `v` have orthonormal (or zero) columns: already an SVD."""
    paths, nodes, _ = mt.targets(adapters)
    layouts: dict[tuple, list[int]] = {}
    for index, target in enumerate(nodes):
        shape = (target[0]["lora_a"].shape[0], target[0]["lora_b"].shape[1])
        ranks = tuple(node["lora_a"].shape[1] for node in target)
        layouts.setdefault((shape, ranks), []).append(index)
    out, token = [None] * len(nodes), None
    for (shape, ranks), indices in layouts.items():
        qa, qb, cores = _group_cores([nodes[i] for i in indices], weights, token)
        u, s, v = core_method(cores, ranks, shape)
        token = s.min()
        left, right = matmul(qa, u), matmul(qb, v)
        for j, i in enumerate(indices):
            dtype = nodes[i][0]["lora_a"].dtype
            if output == "delta":
                delta = matmul(left[j] * (scale * s[j]), right[j].T)
                out[i] = {"delta": delta.astype(dtype)}
                continue
            order = jnp.argsort(-s[j], stable=True)  # descending, so `rank` keeps the largest
            triplet = (left[j][:, order], scale * s[j][order], right[j][:, order].T)
            out[i] = mt.factored_node(triplet, rank or s.shape[1], None, dtype)
    return mt.tree(paths, out)


# ----------------------------------------------------------------------------- the methods


def _iso_c_core(cores, ranks, shape):
    del ranks, shape
    u, s, v = _svd(cores.sum(1))
    return u, _flat(s, _live(s, s[:, :1])), v


@register("iso_c", checks=_OUTPUT)
def iso_c(adapters, weights, key, *, scale=1.0, output="delta", rank=None):
    """Iso-C: the sum's singular vectors with a flat spectrum, the mean of its singular values.

    `T = sum_i t_i = U S V^T`, `dW = scale * mean(S) U V^T`, the mean and U, V taken over the
    sum's nonzero singular values (FusionBench averages all min(in, out) of them, zeros included,
    and spreads that mean over as many directions; at full rank the two are the same).
    """
    del key
    return _spectral_method(adapters, weights, _iso_c_core, scale, output, rank)


def common_and_task_dims(dim: int, tasks: int, fraction: float) -> tuple[int, int]:
    """FusionBench's split of `dim` directions: `(common, per_task)` with `common =
    int(dim * fraction)`, rounded so that the rest is `tasks * per_task` (Python's `round` of
    `(dim - common) / tasks`; lowered by `tasks` where that rounding would pass `dim`)."""
    task_total = round((dim - int(dim * fraction)) / tasks) * tasks
    if task_total > dim:  # only for small fractions; FusionBench would index out of range
        task_total -= tasks
    return dim - task_total, task_total // tasks


def _iso_cts_core(cores, ranks, fraction):
    total = cores.sum(1)
    common, per_task = common_and_task_dims(min(total.shape[1:]), len(ranks), fraction)
    u, s, v = _svd(total)
    lefts, values, rights = [u[..., :common]], [s[:, :common]], [v[..., :common]]
    lives = [_live(s[:, :common], s[:, :1])]
    kept = min(per_task, max(ranks))  # a task's residual has rank <= r_i: the rest is zero
    if kept:
        out_common = v[:, None, :, :common]  # FusionBench's U of the (out, in) sum: our out side
        residual = cores - matmul(matmul(cores, out_common), _swap(out_common))
        u_t, s_t, v_t = _svd(residual)
        norms = jnp.linalg.norm(cores, axis=(-2, -1))[..., None]  # (G, n, 1)
        lefts.append(_task_columns(u_t, kept))
        values.append(s_t[..., :kept].reshape(s.shape[0], -1))
        rights.append(_task_columns(v_t, kept))
        lives.append(
            (_live(s_t[..., :kept], norms).reshape(s.shape[0], -1)) & _rank_mask(ranks, kept)
        )
    live = jnp.concatenate(lives, 1)
    live_columns = live[:, None, :]  # dead directions enter the polar factors as zero columns
    left, right = _polars(
        jnp.concatenate(lefts, 2) * live_columns, jnp.concatenate(rights, 2) * live_columns
    )
    return left, _flat(jnp.concatenate(values, 1), live), right


@register("iso_cts", checks={"common_space_fraction": checks.proportion, **_OUTPUT})
def iso_cts(
    adapters, weights, key, *, common_space_fraction=0.8, scale=1.0, output="delta", rank=None
):
    """Iso-CTS: the sum's top directions plus each task's own, orthogonalised, spectrum flat.

    Of the d directions (d = min(in, out) in FusionBench, here the span's min(in, out, R)),
    `common = int(d * common_space_fraction)` (adjusted so that the rest splits evenly, see
    `common_and_task_dims`) are the top singular pairs `(U_c, s_c, V_c)` of `T = sum_i t_i`; each
    task adds the top `per_task` pairs of `t_i` with its output side projected off the common
    space, `t_i (I - V_c V_c^T)`. The stacked left and right vectors are replaced by their polar
    factors `P_L`, `P_R` and `dW = scale * mean(all kept s) P_L P_R^T`. Pairs of zero singular
    value (a task of rank below `per_task`) are left out rather than filled with arbitrary
    null-space vectors. With common_space_fraction=1 it is `iso_c`.
    """
    del key

    def core(cores, ranks, shape):
        del shape
        return _iso_cts_core(cores, ranks, common_space_fraction)

    return _spectral_method(adapters, weights, core, scale, output, rank)


def _tsv_core(cores, ranks, shape):
    # FusionBench keeps int(min(in, out) * (1 / n)) pairs per task, written so: the float
    # product decides the integer (49 * (1 / 49) < 1).
    per_task = int(min(shape) * (1 / len(ranks)))
    kept = min(per_task, max(ranks), min(cores.shape[2:]))
    g, _, ka, kb = cores.shape
    if not kept:  # more tasks than the layer has directions: FusionBench keeps none
        return jnp.zeros((g, ka, 1)), jnp.zeros((g, 1)), jnp.zeros((g, kb, 1))
    u, s, v = _svd(cores)
    live = _live(s[..., :kept], s[..., :1]).reshape(g, -1) & _rank_mask(ranks, kept)
    live_columns = live[:, None, :]
    left, right = _polars(
        _task_columns(u, kept) * live_columns, _task_columns(v, kept) * live_columns
    )
    return left, jnp.where(live, s[..., :kept].reshape(g, -1), 0.0), right


@register("tsv", checks=_OUTPUT)
def tsv(adapters, weights, key, *, scale=1.0, output="delta", rank=None):
    """TSV-M: each task's top singular triplets, the stacked vectors decorrelated.

    `t_i = U_i S_i V_i^T`; each task keeps its top `k = int(min(in, out) / n)` triplets (fewer if
    its rank is lower: a LoRA task keeps its whole spectrum where r_i <= k, where FusionBench pads
    with arbitrary zero-value pairs); `U = [U_1k ... U_nk]`, `V` likewise, `S = diag(S_1k ...)`,
    and `dW = scale * polar(U) S polar(V)^T`, polar(X) the orthonormal factor of X.
    """
    del key
    return _spectral_method(adapters, weights, _tsv_core, scale, output, rank)
