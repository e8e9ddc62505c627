"""Learned merge coefficients and the merged trees they give (see `jaxmerge.learned.fit`):
their initial values, the tree for given values, and their JSON form, so that a saved merge
is rebuilt without relearning.

For adapters t = 1..n and a target layer l:

    task arithmetic     dW_l(lambda) = sum_t lambda_{t,l} s_t a_t b_t
    ties (AdaMerging++) dW_l(lambda) = sum_t lambda_{t,l} tau_{t,l},
                        tau_t = trim_density(dW_t) * [sign trim(dW_t) = elected sign]
    core                dW_l(M) = A_l M_l B_l,  A_l = [s_1 a_1, ..., s_n a_n] (in, R),
                        B_l = [b_1; ...; b_n] (R, out), M_l (R, R)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lora
from jaxmerge.merging import ops as mu
from jaxmerge.merging.regmean import reduce_off_diagonal, unit_diagonal_solve

Tree = Any
F32 = jnp.float32


def parts_of(adapters: Sequence[Tree], base_merge: str, density: float):
    """(paths, per-target arrays the merged update is a linear function of).

    task_arithmetic: {path: ([s_t a_t], [b_t])}, kept factored so the merged forward costs
    O(sum_t r_t) per token rather than a dense (in, out) matmul's gradient bookkeeping.
    ties: {path: tau (n, in, out)}, TIES' trim and sign election done once, up front: they do
    not depend on lambda (AdaMerging++ learns the weights of the TIES-processed task vectors and
    sums them; the disjoint mean's denominator is left to the learned weights).
    """
    items = [dict(lora.target_items(a)) for a in adapters]
    paths = tuple(items[0])
    parts = {}
    for path in paths:
        nodes = [it[path] for it in items]
        if base_merge == "task_arithmetic":
            parts[path] = (
                [n["scale"].astype(F32) * n["lora_a"].astype(F32) for n in nodes],
                [n["lora_b"].astype(F32) for n in nodes],
            )
        else:
            deltas = jnp.stack([lora.delta_of(n).astype(F32) for n in nodes])
            trimmed = mu.magnitude_prune(deltas, density)
            parts[path] = jnp.where(mu.majority_sign_mask(trimmed, "total"), trimmed, 0.0)
    return paths, parts


ties_parts = jax.jit(
    lambda adapters, density: parts_of(adapters, "ties", density)[1], static_argnums=1
)


def _coefficient(coefficients, granularity: str, path: str, t: int):
    """lambda for adapter t at target `path`: a scalar, or a (r_t,) vector ("rank")."""
    if granularity == "task":
        return coefficients[t]
    return coefficients[path][t]


def merged_tree(coefficients, parts, paths, granularity: str, base_merge: str) -> Tree:
    """The merged 'lora' tree for `coefficients`: factor nodes (task arithmetic, scale 1,
    a = [lambda_1 s_1 a_1, ..., lambda_n s_n a_n], b = [b_1; ...; b_n]) or delta nodes (ties,
    dW = sum_t lambda_t tau_t). Both are valid for `ViT.apply` and `lora.fold_into_base`."""
    tree: Tree = {}
    for path in paths:
        if base_merge == "task_arithmetic" and granularity == "core":
            scaled_a, bs = parts[path]
            a = mu.matmul(jnp.concatenate(scaled_a, axis=1), coefficients[path])
            node = {"lora_a": a, "lora_b": jnp.concatenate(bs, 0), "scale": jnp.ones((), F32)}
        elif base_merge == "task_arithmetic":
            scaled_a, bs = parts[path]
            a = jnp.concatenate(
                [
                    x * _coefficient(coefficients, granularity, path, t)
                    for t, x in enumerate(scaled_a)
                ],
                axis=1,
            )
            node = {"lora_a": a, "lora_b": jnp.concatenate(bs, 0), "scale": jnp.ones((), F32)}
        else:
            taus = parts[path]
            weights = jnp.stack(
                [_coefficient(coefficients, granularity, path, t) for t in range(taus.shape[0])]
            )
            node = {"delta": mu.weighted_sum(taus, weights)}
        tree = lora.set_at(tree, path, node)
    return tree


def init_coefficients(adapters: Sequence[Tree], granularity: str, init: float):
    """Every lambda set to `init`: an (n,) array ("task"), {path: (n,)} ("layer") or
    {path: [(r_t,) for each adapter]} ("rank")."""
    n, items = len(adapters), [dict(lora.target_items(a)) for a in adapters]
    if granularity == "task":
        return jnp.full((n,), init, F32)
    if granularity == "layer":
        return {path: jnp.full((n,), init, F32) for path in items[0]}
    if granularity == "core":
        sizes = {path: sum(it[path]["lora_a"].shape[1] for it in items) for path in items[0]}
        return {path: init * jnp.eye(r, dtype=F32) for path, r in sizes.items()}
    return {
        path: [jnp.full((it[path]["lora_a"].shape[1],), init, F32) for it in items]
        for path in items[0]
    }


@jax.jit
def core_regmean(
    scaled_a: Sequence[jax.Array], grams: Sequence[jax.Array], reduce_non_diagonal_ratio
) -> jax.Array:
    """RegMean restricted to the core (one layer): the (R, R) mixing matrix M minimising
    sum_t |X_t A (M - E_t) B|^2, so that dW = A M B is the update nearest, on each task's own
    layer inputs X_t, to each task's own update A E_t B (E_t selects task t's block).

    With C_t = A^T G_t' A (G_t' = task t's Gram, off-diagonal scaled as RegMean does)
    and B of full row rank, the normal equations give M = (sum_t C_t)^-1 [C_1 E_1 ... C_n E_n]:
    an R x R solve instead of RegMean's (in x in) one, and a start for the learned "core" merge
    that already undoes much of the interference.

    Args:
      scaled_a: per task, s_t a_t (in, r_t).
      grams: per task, (in, in) mean Gram of the layer's inputs on its own model.
      reduce_non_diagonal_ratio: the off-diagonal factor in [0, 1] (RegMean's setting).
    """
    a = jnp.concatenate(scaled_a, axis=1)
    ratio = reduce_non_diagonal_ratio
    cores = [mu.matmul(a.T, mu.matmul(reduce_off_diagonal(g, ratio), a)) for g in grams]
    bounds = np.cumsum([0] + [x.shape[1] for x in scaled_a])
    rhs = jnp.concatenate(
        [c[:, lo:hi] for c, lo, hi in zip(cores, bounds[:-1], bounds[1:])], axis=1
    )
    return unit_diagonal_solve(sum(cores), rhs)[0]


def rebuild(
    adapters: Sequence[Tree],
    coefficients,
    granularity: str,
    base_merge: str = "task_arithmetic",
    density: float = 0.2,
) -> Tree:
    """The merged tree of `learn_merge` from saved coefficients (e.g. read back from JSON with
    `coefficients_from_json`), without relearning."""
    paths, parts = parts_of(adapters, base_merge, density)
    dtype = lora.target_items(adapters[0])[0][1]["lora_a"].dtype
    tree = merged_tree(coefficients, parts, paths, granularity, base_merge)
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def coefficients_from_json(value, granularity: str) -> Any:
    """The inverse of `coefficients_to_json` for coefficients of `granularity`."""
    if granularity == "task":
        return jnp.asarray(value, F32)
    if granularity == "rank":
        return {path: [jnp.asarray(v, F32) for v in vs] for path, vs in value.items()}
    return {path: jnp.asarray(v, F32) for path, v in value.items()}


def coefficients_to_json(coefficients) -> Any:
    """The coefficients as nested lists and dicts, for json.dump."""
    return jax.tree.map(lambda x: np.asarray(x).tolist(), coefficients)
