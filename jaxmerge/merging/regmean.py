"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): the closed-form merge of linear layers from the Gram matrices of their inputs.

For one layer with kernel `W_i = W_0 + dW_i` (in, out) in task i and the mean Gram
`G_i = X_i^T X_i / N_i` of that layer's inputs on task i's images, RegMean solves
`min_W sum_i ||X_i W - X_i W_i||^2`, i.e. `W* = (sum_i G_i)^-1 sum_i G_i W_i`, after shrinking
each Gram's off-diagonal entries by `ratio` (`G_i <- ratio G_i + (1 - ratio) diag(G_i)`, the
paper's regularisation; FusionBench's `reduce_non_diagonal_ratio`). The tasks share `W_0`, so
the merged update is `dW* = (sum_i G_i)^-1 sum_i G_i dW_i`. Pure functions; the callers
collect the Grams (`jaxmerge.layer_inputs`) and pick which inputs they are taken on (RegMean++
takes them in the partly merged model, `jaxmerge.recipes.regmean`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Below this reciprocal condition number of the diagonally scaled summed Gram, a float32
# solve keeps no correct digit: the layer is refused instead of returning noise or NaN.
MIN_RCOND = 1e-6


def reduce_off_diagonal(gram: jax.Array, ratio) -> jax.Array:
    """`ratio * G + (1 - ratio) * diag(G)`: off-diagonal entries scaled by `ratio`."""
    diagonal = jnp.diagonal(gram)
    return ratio * gram + (1.0 - ratio) * jnp.diag(diagonal)


def unit_diagonal_solve(total: jax.Array, rhs: jax.Array):
    """(total^-1 rhs, total scaled to unit diagonal, which diagonal entries are > 0): the solve
    runs on the scaled system, which keeps float32 accurate for inputs of very different
    magnitudes (a zero diagonal entry is left unscaled)."""
    diagonal = jnp.diagonal(total)
    seen = diagonal > 0
    root = jnp.sqrt(jnp.where(seen, diagonal, 1.0))
    scaled = total / root[:, None] / root[None, :]
    return jnp.linalg.solve(scaled, rhs / root[:, None]) / root[:, None], scaled, seen


@jax.jit
def regmean_layer(grams: jax.Array, deltas: jax.Array, ratio) -> tuple[jax.Array, jax.Array]:
    """One layer's RegMean update `dW* = (sum_i G_i')^-1 sum_i G_i' dW_i`, `G_i'` reduced.

    Args:
      grams: (T, in, in) each task's Gram of the layer's inputs (any common scale per task:
        FusionBench and `layer_inputs` use the mean over input rows).
      deltas: (T, in, out) each task's update of the layer's (in, out) kernel.
      ratio: the off-diagonal factor in [0, 1].

    Returns:
      (dW* (in, out) float32, rcond): the reciprocal condition number of the summed Gram after
      scaling it to unit diagonal (0 where an input feature is zero on every task); the
      solve runs on that scaled system, which keeps float32 accurate for inputs of very
      different magnitudes.
    """
    grams, deltas = grams.astype(F32), deltas.astype(F32)
    reduced = jax.vmap(reduce_off_diagonal, in_axes=(0, None))(grams, ratio)
    total = reduced.sum(0)
    rhs = jnp.einsum("tij,tjo->io", reduced, deltas, precision="highest")
    merged, scaled, seen = unit_diagonal_solve(total, rhs)
    eigenvalues = jnp.linalg.eigvalsh(scaled)
    rcond = jnp.where(seen.all(), eigenvalues[0] / eigenvalues[-1], 0.0)
    return merged, rcond


def regmean_deltas(
    grams: Sequence[Mapping[str, jax.Array]],
    deltas: Sequence[Mapping[str, jax.Array]],
    ratio: float,
) -> dict[str, jax.Array]:
    """{path: dW*} of `regmean_layer` for every path of `deltas[0]`.

    Args:
      grams: per task, {path: (in, in) Gram of that layer's inputs on the task's images}.
      deltas: per task, {path: (in, out) update}; every task has every path (zero where a task
        does not adapt the layer).
      ratio: the off-diagonal factor.

    Raises:
      ValueError naming the first layer whose summed Gram is singular (an input feature that
      is zero on every image, or linearly dependent inputs with `ratio` 1), never a NaN.
    """
    merged = {}
    for path in deltas[0]:
        layer, rcond = regmean_layer(
            jnp.stack([g[path] for g in grams]), jnp.stack([d[path] for d in deltas]), ratio
        )
        if not float(rcond) > MIN_RCOND:
            raise ValueError(
                f"regmean: the Gram matrix of layer {path!r}'s inputs is singular (reciprocal "
                f"condition {float(rcond):.1e} <= {MIN_RCOND:g}); allowed: inputs that span the "
                f"layer's input space, or reduce_non_diagonal_ratio < 1"
            )
        merged[path] = layer
    return merged
