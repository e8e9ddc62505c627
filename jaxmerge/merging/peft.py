"""PEFT's `add_weighted_adapter` methods (PEFT 0.21 names, parameters and numerics), registered
in `merging.METHODS`: `cat`, `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` on the
factors, and `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`
through a truncated SVD of the combined dW.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxmerge.merging import factorize as fz
from jaxmerge.merging import ops as mu
from jaxmerge.merging import registry as checks
from jaxmerge.merging import targets as mt
from jaxmerge.merging.registry import register

F32 = jnp.float32


@register("cat", peft=True)
def cat(adapters, weights, key):
    """PEFT `cat`: `a = [w_1 s_1 a_1, ..., w_n s_n a_n]`, `b = [b_1; ...; b_n]`, rank sum r_i.

    Exact: `a @ b = sum_i w_i dW_i`.
    """
    del key

    def node(nodes, _):
        return mt.adapter_node(*mt.weighted_factors(nodes, weights), nodes[0]["lora_a"].dtype)

    return mt.map_nodes(node, adapters)


def _factor_space(adapters, weights, key, combiner: _Combiner):
    """PEFT's factor-space merge: with `c_i = w_i s_i`, A and B are combined separately as
    `a = join(a_i, sign(c_i) sqrt|c_i|)` and `b = join(b_i, sqrt|c_i|)`, each pruned first."""
    paths, nodes, noises = mt.targets(adapters, key, mt.factor_draws)
    stacks, stack_noises = [], []
    for target_nodes, noise in zip(nodes, noises):
        a, b = mt.stack(target_nodes, "lora_a"), mt.stack(target_nodes, "lora_b")
        stacks += [a, b]
        stack_noises += [None, None] if noise is None else [noise[: a.size], noise[a.size :]]
    pruned = combiner.prune(stacks, stack_noises)
    merged = []
    for index, target_nodes in enumerate(nodes):
        coefficients = weights * mt.scales(target_nodes)
        root = jnp.sqrt(jnp.abs(coefficients))
        a = combiner.join(pruned[2 * index], jnp.where(coefficients >= 0, root, -root))
        b = combiner.join(pruned[2 * index + 1], root)
        merged.append(mt.adapter_node(a, b, target_nodes[0]["lora_a"].dtype))
    return mt.tree(paths, merged)


@dataclasses.dataclass(frozen=True)
class _Combiner:
    """PEFT merge_utils' combination of one method kind, in two steps: `prune` each (n, ...)
    task stack, then `join` one pruned stack with its weights."""

    kind: str
    density: float = 1.0
    majority_sign_method: str = "total"

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"combiner kind: got {self.kind!r}; allowed: one of {list(_KINDS)}")

    def prune(self, stacks, noises):
        """Magnitude kinds select every stack in one batched pass (`magnitude_prune_each`)."""
        if self.kind in ("magnitude_prune", "ties"):
            return mu.magnitude_prune_each(stacks, self.density)
        if self.kind in ("dare_linear", "dare_ties"):
            return [mu.random_prune(n, s, self.density) for s, n in zip(stacks, noises)]
        return list(stacks)

    def join(self, pruned, weights):
        if self.kind in ("ties", "dare_ties"):
            return mu.ties_combine(pruned, weights, self.majority_sign_method)
        return mu.weighted_sum(pruned, weights)

    def __call__(self, tensors, weights, noise):
        """One (n, ...) task stack pruned and joined."""
        return self.join(self.prune([tensors], [noise])[0], weights)


_KINDS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
_SIGN = {"majority_sign_method": checks.SIGN_METHOD}
_SVD = {"svd_rank": checks.rank, "svd_clamp": checks.fraction}


@register("linear", equal_ranks=True, peft=True)
def linear(adapters, weights, key):
    """PEFT `linear`: `a = sum_i sign(c_i) sqrt|c_i| a_i`, `b = sum_i sqrt|c_i| b_i`, c_i = w_i s_i.

    Not the weighted sum of dW_i (cross terms a_i b_j appear) unless there is one adapter.
    """
    return _factor_space(adapters, weights, key, _Combiner("linear"))


@register("ties", checks={"density": checks.density, **_SIGN}, equal_ranks=True, peft=True)
def ties(adapters, weights, key, *, density, majority_sign_method="total"):
    """PEFT `ties` on A and B separately: trim to the top-`density` magnitudes, elect signs,
    disjoint mean of the weighted factors (weights as in `linear`)."""
    return _factor_space(adapters, weights, key, _Combiner("ties", density, majority_sign_method))


@register(
    "dare_linear",
    checks={"density": checks.density},
    equal_ranks=True,
    needs_key=True,
    peft=True,
)
def dare_linear(adapters, weights, key, *, density):
    """PEFT `dare_linear` on A and B: drop entries with probability 1 - density, rescale the rest
    by 1/density, weighted sum (weights as in `linear`)."""
    return _factor_space(adapters, weights, key, _Combiner("dare_linear", density))


@register(
    "dare_ties",
    checks={"density": checks.density, **_SIGN},
    equal_ranks=True,
    needs_key=True,
    peft=True,
)
def dare_ties(adapters, weights, key, *, density, majority_sign_method="total"):
    """PEFT `dare_ties` on A and B: DARE drop-and-rescale, then TIES sign election and mean."""
    return _factor_space(
        adapters, weights, key, _Combiner("dare_ties", density, majority_sign_method)
    )


@register("magnitude_prune", checks={"density": checks.density}, equal_ranks=True, peft=True)
def magnitude_prune(adapters, weights, key, *, density):
    """PEFT `magnitude_prune` on A and B: keep the top-`density` magnitudes, weighted sum."""
    return _factor_space(adapters, weights, key, _Combiner("magnitude_prune", density))


def _svd_family(adapters, weights, key, combiner: _Combiner, svd_rank, svd_clamp):
    """PEFT's `*_svd` methods: `dW = combine(dW_i, w_i)` densely, then its rank-r truncated SVD
    `u_r (s_r vh_r)` becomes `(lora_a, lora_b)`, optionally clamped (see `fz.clamp_factors`).

    PEFT takes a full LAPACK SVD of each dW and keeps r triplets; `fz.top_svds` finds those r
    by subspace iteration from the span of the input `lora_a`s, to a tested residual.
    """
    rank = svd_rank or mt.max_rank(adapters)
    paths, nodes, noises = mt.targets(adapters, key, mt.dense_draws)
    # One target a loop: a target's dense (n, d, d) stack already fills each pass, and more
    # would not stay in cache.
    deltas = [combiner(mt.deltas(n), weights, noise) for n, noise in zip(nodes, noises)]
    triplets = fz.top_svds(deltas, [mt.stacked_a(n) for n in nodes], rank)
    return mt.tree(
        paths,
        [
            mt.factored_node(triplet, rank, svd_clamp, n[0]["lora_a"].dtype)
            for n, triplet in zip(nodes, triplets)
        ],
    )


@register("svd", checks=_SVD, peft=True)
def svd(adapters, weights, key, *, svd_rank=None, svd_clamp=None):
    """PEFT `svd`: the rank-r truncated SVD of `sum_i w_i dW_i`, r = svd_rank or the largest
    input rank, singular values in lora_b, optionally clamped to the `svd_clamp` quantile.

    Computed exactly from the stacked factors (`fz.thin_svds`, all targets in one batched
    computation), never forming a d x d matrix.
    """
    del key
    rank = svd_rank or mt.max_rank(adapters)
    paths, nodes, _ = mt.targets(adapters)
    svds = fz.thin_svds([mt.weighted_factors(n, weights) for n in nodes], rank)
    return mt.tree(
        paths,
        [
            mt.factored_node(triplet, rank, svd_clamp, n[0]["lora_a"].dtype)
            for n, triplet in zip(nodes, svds)
        ],
    )


@register("ties_svd", checks={"density": checks.density, **_SIGN, **_SVD}, peft=True)
def ties_svd(
    adapters, weights, key, *, density, majority_sign_method="total", svd_rank=None, svd_clamp=None
):
    """PEFT `ties_svd`: TIES on the dense dW_i, then truncated SVD as in `svd`."""
    combiner = _Combiner("ties", density, majority_sign_method)
    return _svd_family(adapters, weights, key, combiner, svd_rank, svd_clamp)


@register("dare_linear_svd", checks={"density": checks.density, **_SVD}, needs_key=True, peft=True)
def dare_linear_svd(adapters, weights, key, *, density, svd_rank=None, svd_clamp=None):
    """PEFT `dare_linear_svd`: DARE on the dense dW_i, weighted sum, truncated SVD."""
    combiner = _Combiner("dare_linear", density)
    return _svd_family(adapters, weights, key, combiner, svd_rank, svd_clamp)


@register(
    "dare_ties_svd",
    checks={"density": checks.density, **_SIGN, **_SVD},
    needs_key=True,
    peft=True,
)
def dare_ties_svd(
    adapters, weights, key, *, density, majority_sign_method="total", svd_rank=None, svd_clamp=None
):
    """PEFT `dare_ties_svd`: DARE then TIES on the dense dW_i, truncated SVD."""
    combiner = _Combiner("dare_ties", density, majority_sign_method)
    return _svd_family(adapters, weights, key, combiner, svd_rank, svd_clamp)


@register("magnitude_prune_svd", checks={"density": checks.density, **_SVD}, peft=True)
def magnitude_prune_svd(adapters, weights, key, *, density, svd_rank=None, svd_clamp=None):
    """PEFT `magnitude_prune_svd`: magnitude pruning of the dense dW_i, weighted sum, SVD."""
    combiner = _Combiner("magnitude_prune", density)
    return _svd_family(adapters, weights, key, combiner, svd_rank, svd_clamp)
