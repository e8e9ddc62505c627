"""Delta-space merge methods from the merging literature, registered in `merging.METHODS`:
`task_arithmetic`, `ties_delta`, `dare_delta`, `breadcrumbs` and `knots`, on
`dW_i = scale_i a_i @ b_i`. Their `output` is "delta" (`{"delta": dW}` nodes) or "factored"
(an adapter of rank `rank`, by default the largest input rank, from a truncated SVD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from jaxmerge.merging import factorize as fz
from jaxmerge.merging import ops as mu
from jaxmerge.merging import registry as checks
from jaxmerge.merging import targets as mt
from jaxmerge.merging.registry import register

F32 = jnp.float32
# Every delta-space method scales its result and returns a delta tree or rank-r factors.
_OUTPUT = {"scale": checks.number, "output": checks.OUTPUT, "rank": checks.rank}
_TIES = {"density": checks.density, "majority_sign_method": checks.SIGN_METHOD}


def _gamma_and_density(params):
    if params["gamma"] + params["density"] > 1.0:
        raise ValueError(
            f"gamma: got gamma={params['gamma']} with density={params['density']}; allowed: "
            f"gamma + density <= 1"
        )


def _delta_method(adapters, merged_node, output, rank, key=None, draws=None):
    """Runs `merged_node(nodes, noise) -> ("dense", dW) | ("lowrank", a, b)` on every target
    and returns the `output` kind: `{"delta": dW}` nodes, or rank-r factors of a truncated SVD
    (exact and thin for low-rank results, `fz.top_svds` from the inputs' span for dense ones).
    """
    rank = rank or mt.max_rank(adapters)
    paths, nodes, noises = mt.targets(adapters, key, draws)
    parts = [merged_node(n, noise) for n, noise in zip(nodes, noises)]
    dtypes = [n[0]["lora_a"].dtype for n in nodes]
    if output == "delta":
        deltas = [p[1] if p[0] == "dense" else mu.matmul(p[1], p[2]) for p in parts]
        return mt.tree(paths, [{"delta": d.astype(t)} for d, t in zip(deltas, dtypes)])
    dense = [i for i, p in enumerate(parts) if p[0] == "dense"]
    lowrank = [i for i, p in enumerate(parts) if p[0] == "lowrank"]
    triplets = {}
    if dense:
        matrices = [parts[i][1] for i in dense]
        triplets.update(
            zip(dense, fz.top_svds(matrices, [mt.stacked_a(nodes[i]) for i in dense], rank))
        )
    if lowrank:
        triplets.update(zip(lowrank, fz.thin_svds([parts[i][1:] for i in lowrank], rank)))
    return mt.tree(
        paths, [mt.factored_node(triplets[i], rank, None, t) for i, t in enumerate(dtypes)]
    )


@register("task_arithmetic", checks=_OUTPUT)
def task_arithmetic(adapters, weights, key, *, scale=1.0, output="delta", rank=None):
    """Task arithmetic (Ilharco et al. 2023): `dW = scale * sum_i w_i dW_i`.

    Formed from the stacked factors, so the factored output is an exact thin SVD.
    """
    del key

    def node(nodes, _):
        a, b = mt.weighted_factors(nodes, weights)
        return ("lowrank", scale * a, b)

    return _delta_method(adapters, node, output, rank)


@register("ties_delta", checks={**_TIES, **_OUTPUT})
def ties_delta(
    adapters,
    weights,
    key,
    *,
    density=0.2,
    majority_sign_method="total",
    scale=1.0,
    output="delta",
    rank=None,
):
    """TIES-merging (Yadav et al. 2023) on dW: trim, elect sign, disjoint mean.

    `t_i = w_i trim_density(dW_i)`, `g = sign(sum_i t_i)` ("total") or the sign vote
    ("frequency"), `dW = scale * sum_i t_i [sign t_i = g] / max(1, #{i: sign t_i = g})`.
    """
    del key

    def node(nodes, _):
        trimmed = mu.magnitude_prune(mt.deltas(nodes), density)
        weighted = trimmed * weights[:, None, None]
        mask = mu.majority_sign_mask(weighted, majority_sign_method)
        return ("dense", scale * mu.disjoint_mean(weighted, mask))

    return _delta_method(adapters, node, output, rank)


@register("dare_delta", checks={"density": checks.density, **_OUTPUT}, needs_key=True)
def dare_delta(adapters, weights, key, *, density=0.1, scale=1.0, output="delta", rank=None):
    """DARE (Yu et al. 2023) on dW: `dW = scale * sum_i w_i m_i dW_i / density`, with
    `m_i ~ Bernoulli(density)` per entry, so that E[dW] is the task-arithmetic sum."""

    def node(nodes, noise):
        pruned = mu.random_prune(noise, mt.deltas(nodes), density)
        return ("dense", scale * mu.weighted_sum(pruned, weights))

    return _delta_method(adapters, node, output, rank, key, mt.dense_draws)


@register(
    "breadcrumbs",
    checks={"density": checks.density, "gamma": checks.fraction, **_OUTPUT},
    check_together=_gamma_and_density,
)
def breadcrumbs(
    adapters, weights, key, *, density=0.1, gamma=0.01, scale=1.0, output="delta", rank=None
):
    """Model Breadcrumbs (Davari & Belilovsky 2023): per task and layer, drop the `gamma`
    fraction of largest |dW_i| (outliers) and all but the next `density` fraction (noise), then
    `dW = scale * sum_i w_i mask_i dW_i`."""
    del key

    def node(nodes, _):
        deltas = mt.deltas(nodes)
        masked = jnp.stack([d * mu.magnitude_band_mask(d, density, gamma) for d in deltas])
        return ("dense", scale * mu.weighted_sum(masked, weights))

    return _delta_method(adapters, node, output, rank)


@register("knots", checks={"combine": checks.choice("ties", "task_arithmetic"), **_TIES, **_OUTPUT})
def knots(
    adapters,
    weights,
    key,
    *,
    combine="ties",
    density=0.2,
    majority_sign_method="total",
    scale=1.0,
    output="delta",
    rank=None,
):
    """KnOTS (Stoica et al. 2024): align the tasks in one SVD basis, merge there.

    In (out, in) layout the paper takes `[dW_1^T ... dW_n^T] = U S [V_1^T ... V_n^T]`, so that
    `dW_i^T = U S V_i^T` with a shared U S. In our (in, out) layout, `dW_i = V_i S U^T`. The
    per-task `V_i` (in, R) are merged, `V = ties(w_i V_i)` (trim to `density`, elect sign,
    disjoint mean) or `V = sum_i w_i V_i` (combine="task_arithmetic"), and
    `dW = scale * V S U^T`. R = sum_i r_i; the SVD is taken from QRs of the factors (thin).
    """
    del key

    def node(nodes, _):
        scaled = [n["scale"].astype(F32) * n["lora_a"].astype(F32) for n in nodes]
        qrs = [jnp.linalg.qr(a) for a in scaled]
        q_b, r_b = jnp.linalg.qr(jnp.concatenate([n["lora_b"].astype(F32) for n in nodes]).T)
        core = mu.matmul(jax.scipy.linalg.block_diag(*[r for _, r in qrs]), r_b.T)
        u_core, s, vh_core = jnp.linalg.svd(core, full_matrices=False)
        offsets = [0]
        for q, _ in qrs:
            offsets.append(offsets[-1] + q.shape[1])
        per_task = jnp.stack(
            [mu.matmul(q, u_core[lo:hi]) for (q, _), lo, hi in zip(qrs, offsets, offsets[1:])]
        )
        weighted = per_task * weights[:, None, None]
        if combine == "ties":
            weighted = mu.magnitude_prune(per_task, density) * weights[:, None, None]
            merged = mu.disjoint_mean(
                weighted, mu.majority_sign_mask(weighted, majority_sign_method)
            )
        else:
            merged = mu.task_sum(weighted)
        return ("lowrank", scale * merged * s, mu.matmul(vh_core, q_b.T))

    return _delta_method(adapters, node, output, rank)
