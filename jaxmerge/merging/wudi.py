"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors"), registered in `merging.METHODS` as `wudi`.

No data: each layer's merged update is fitted by gradient steps on the task vectors alone, so
that the interference it leaves on each task's own input directions is small. The numerics are
those of FusionBench 0.2.33's `fusion_bench.method.wudi.wudi.wudi_merging` (golden files from
`scripts/make_golden_wudi.py`); the factors keep every product small (see `_gradient_terms`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merging import registry as checks
from jaxmerge.merging import targets as mt
from jaxmerge.merging.ops import matmul
from jaxmerge.merging.registry import register

F32 = jnp.float32
# torch.optim.Adam's defaults, which FusionBench keeps (it sets only lr and weight_decay=0).
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-8


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _gradient_terms(a, b, ranks):
    """`(W, E)` such that the WUDI loss of a batch of layers has gradient `W (a^T M) - E`.

    With `D_i = a_i b_i` (weights and scales folded into `a`), the loss
    `L(M) = sum_i c_i ||(M - D_i)^T D_i||_F^2`, `c_i = 1 / ||D_i||_F^2`, has gradient
    `sum_i 2 c_i D_i D_i^T (M - D_i) = a K (a^T M) - a K H_blk b`, with `K` the block diagonal
    of `2 c_i b_i b_i^T` and `H_blk` that of `a_i^T a_i` (R x R): each step costs two (in, R)
    by (R, out) products, not the T (out, in) by (in, out) products of the dense loss.
    A zero task vector (an adapter without this target) gets `c_i = 0` instead of 0 / 0.

    Args:
      a: (L, in, R) stacked `[w_1 s_1 a_1, ..., w_T s_T a_T]` of L layers.
      b: (L, R, out) stacked `[b_1; ...; b_T]`.
      ranks: the T tasks' ranks, summing to R.
    """
    task = np.repeat(np.arange(len(ranks)), ranks)
    one_hot = jnp.asarray(task[:, None] == np.arange(len(ranks))[None, :], F32)  # (R, T)
    block = matmul(one_hot, one_hot.T)  # 1 where two columns belong to one task
    gram_a = matmul(_swap(a), a) * block
    gram_b = matmul(b, _swap(b)) * block
    # ||D_i||_F^2 = tr(a_i^T a_i b_i b_i^T): the task's block of the entrywise product, summed.
    norms = matmul(jnp.sum(gram_a * gram_b, axis=-2), one_hot)  # (L, T)
    inverse = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    kernel = 2.0 * gram_b * matmul(inverse, one_hot.T)[..., None, :]
    w = matmul(a, kernel)
    return w, matmul(w, matmul(gram_a, b))


def _adam_fit(start, a, w, e, steps: int, learning_rate):
    """`steps` Adam steps (torch's update: bias-corrected moments, `eps` outside the root) on
    `M`, from `start`, for the gradient `W (a^T M) - E`; one `lax.scan` over the batch."""

    def step(state, t):
        merged, mean, second = state
        grad = matmul(w, matmul(_swap(a), merged)) - e
        mean = BETA_1 * mean + (1.0 - BETA_1) * grad
        second = BETA_2 * second + (1.0 - BETA_2) * grad * grad
        denominator = jnp.sqrt(second) / jnp.sqrt(1.0 - BETA_2**t) + EPSILON
        merged = merged - (learning_rate / (1.0 - BETA_1**t)) * mean / denominator
        return (merged, mean, second), None

    zeros = jnp.zeros_like(start)
    (merged, _, _), _ = jax.lax.scan(
        step, (start, zeros, zeros), jnp.arange(1, steps + 1, dtype=F32)
    )
    return merged


@register(
    "wudi",
    checks={
        "steps": checks.count,
        "learning_rate": checks.positive,
        "scale": checks.number,
        "output": checks.OUTPUT,
        "rank": checks.rank,
    },
)
def wudi(
    adapters, weights, key, *, steps=300, learning_rate=1e-5, scale=1.0, output="delta", rank=None
):
    """WUDI (Cheng et al., ICML 2025): per layer, `steps` Adam steps (torch defaults, learning
    rate `learning_rate`, no weight decay) on the merged update `tau_m`, from the task sum, on

        `sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`

    in FusionBench's (out, in) orientation (`tau_i = w_i dW_i^T`); then `dW = scale * tau_m^T`.
    As in FusionBench the fitted update is not averaged; `steps=0` is task arithmetic. Layers
    of one shape and ranks share one jitted scan; the gradient goes through the factors
    (`_gradient_terms`). `output="factored"` keeps a rank-`rank` truncated SVD.
    """
    del key
    paths, nodes, _ = mt.targets(adapters)
    groups: dict[tuple, list[int]] = {}
    for index, target_nodes in enumerate(nodes):
        in_out = (target_nodes[0]["lora_a"].shape[0], target_nodes[0]["lora_b"].shape[1])
        ranks = tuple(n["lora_a"].shape[1] for n in target_nodes)
        groups.setdefault((in_out, ranks), []).append(index)
    fitted = [None] * len(nodes)
    for (_, ranks), indices in groups.items():
        factors = [mt.weighted_factors(nodes[i], weights) for i in indices]
        a = jnp.stack([f[0] for f in factors])
        b = jnp.stack([f[1] for f in factors])
        w, e = _gradient_terms(a, b, ranks)
        merged = _adam_fit(matmul(a, b), a, w, e, steps, learning_rate)
        for j, i in enumerate(indices):
            fitted[i] = scale * merged[j]
    return mt.dense_output(adapters, paths, nodes, fitted, output, rank)
