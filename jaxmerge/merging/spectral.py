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


def _span_cores(nodes, weights):
    """`(Qa (in, ka), Qb (out, kb), [C_1, ..., C_n])` with `t_i = Qa C_i Qb^T`, C_i (ka, kb),
    ka = min(in, R), kb = min(out, R): Householder QRs of the weighted stacked factors."""
    a, b = mt.weighted_factors(nodes, weights)
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b.T)
    cores, start = [], 0
    for node in nodes:
        stop = start + node["lora_a"].shape[1]
        cores.append(matmul(ra[:, start:stop], rb[:, start:stop].T))
        start = stop
    return qa, qb, cores


def _sum(cores):
    total = cores[0]
    for core in cores[1:]:
        total = total + core
    return total


def _svd(core):
    """`(u, s, v)` with `core = l diag(s) r^T`, s descending (r is LAPACK's vh transposed)."""
    u, s, vh = jnp.linalg.svd(core, full_matrices=False)
    return u, s, vh.T


def _polar(x):
    """The orthonormal polar factor `U V^T` of `x = U S V^T` (thin SVD): the orthonormal matrix
    nearest to `x`, as FusionBench orthogonalises stacked singular vectors."""
    u, _, vh = jnp.linalg.svd(x, full_matrices=False)
    return matmul(u, vh)


def _live(s, reference):
    """Which singular values are nonzero, i.e. above `RANK_RTOL * reference`."""
    return s > RANK_RTOL * reference


def _flat(s, live):
    """Every live singular value replaced by the mean of the live ones; the others by 0."""
    mean = jnp.where(live, s, 0.0).sum() / jnp.maximum(live.sum(), 1)
    return jnp.where(live, mean, 0.0)


def _spectral_method(adapters, weights, core_method, scale, output, rank):
    """Runs `core_method(cores, ranks, (in, out)) -> (u (ka, k), s (k,), v (kb, k))` per target,
    for the merged update `Qa u diag(scale s) v^T Qb^T`, and returns `output`: `{"delta": dW}`
    nodes, or factors of rank `rank` (default: every direction the method returns, so exact).
    `u` and `v` have orthonormal (or zero) columns, so `(Qa u, s, (Qb v)^T)` is already an SVD."""
    paths, nodes, _ = mt.targets(adapters)
    out = []
    for target in nodes:
        fan_in, fan_out = target[0]["lora_a"].shape[0], target[0]["lora_b"].shape[1]
        qa, qb, cores = _span_cores(target, weights)
        ranks = [node["lora_a"].shape[1] for node in target]
        u, s, v = core_method(cores, ranks, (fan_in, fan_out))
        dtype = target[0]["lora_a"].dtype
        left, right = matmul(qa, u), matmul(qb, v)
        if output == "delta":
            delta = matmul(left * (scale * s), right.T)
            out.append({"delta": delta.astype(dtype)})
            continue
        order = jnp.argsort(-s, stable=True)  # descending, so `rank` keeps the largest
        triplet = (left[:, order], scale * s[order], right[:, order].T)
        out.append(mt.factored_node(triplet, rank or s.shape[0], None, dtype))
    return mt.tree(paths, out)


# ----------------------------------------------------------------------------- the methods


def _iso_c_core(cores, ranks, shape):
    del ranks, shape
    u, s, v = _svd(_sum(cores))
    return u, _flat(s, _live(s, s[0])), v


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
    total = _sum(cores)
    common, per_task = common_and_task_dims(min(total.shape), len(cores), fraction)
    u, s, v = _svd(total)
    lefts, values, rights = [u[:, :common]], [s[:common]], [v[:, :common]]
    lives = [_live(s[:common], s[0])]
    out_common = v[:, :common]  # FusionBench's U of the (out, in) sum: our output side
    for core, task_rank in zip(cores, ranks):
        kept = min(per_task, task_rank)  # the residual has rank <= r_i: the rest is zero
        if not kept:
            continue
        residual = core - matmul(matmul(core, out_common), out_common.T)
        u_i, s_i, v_i = _svd(residual)
        lefts.append(u_i[:, :kept])
        values.append(s_i[:kept])
        rights.append(v_i[:, :kept])
        lives.append(_live(s_i[:kept], jnp.linalg.norm(core)))
    live = jnp.concatenate(lives)
    left = _polar(jnp.concatenate(lefts, 1) * live)  # dead directions as zero columns
    right = _polar(jnp.concatenate(rights, 1) * live)
    return left, _flat(jnp.concatenate(values), live), right


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
    per_task = int(min(shape) * (1 / len(cores)))
    lefts, values, rights, lives = [], [], [], []
    for core, task_rank in zip(cores, ranks):
        kept = min(per_task, task_rank, min(core.shape))
        if not kept:  # more tasks than the layer has directions: FusionBench keeps none
            continue
        u, s, v = _svd(core)
        lefts.append(u[:, :kept])
        values.append(s[:kept])
        rights.append(v[:, :kept])
        lives.append(_live(s[:kept], s[0]))
    if not lefts:
        return jnp.zeros((cores[0].shape[0], 1)), jnp.zeros((1,)), jnp.zeros((cores[0].shape[1], 1))
    live = jnp.concatenate(lives)
    s = jnp.where(live, jnp.concatenate(values), 0.0)
    left = _polar(jnp.concatenate(lefts, 1) * live)
    right = _polar(jnp.concatenate(rights, 1) * live)
    return left, s, right


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
