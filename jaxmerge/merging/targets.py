"""Per-target plumbing of the merge methods: gather each target's node across adapters, draw
its noise, stack its factors, and build the result tree. Pure functions on adapter trees.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxmerge import lora
from jaxmerge.merging import factorize as fz
from jaxmerge.merging import ops as mu
from jaxmerge.merging import threefry

Tree = Any
F32 = jnp.float32


def targets(adapters, key=None, draws=None):
    """`(paths, nodes, noises)`: each target's path, its node in every adapter, and its noise.

    With a key, `noise` is that target's slice of one flat draw of uint32 bits holding
    `draws(nodes)` numbers per target (`threefry.random_bits`: the stream of
    `jax.random.bits(key, (total,), uint32)`, one call for all targets); without, None.
    """
    items = [lora.target_items(adapter) for adapter in adapters]
    paths = [path for path, _ in items[0]]
    nodes = [[it[index][1] for it in items] for index in range(len(paths))]
    noises = [None] * len(paths)
    if key is not None:
        counts = [draws(target_nodes) for target_nodes in nodes]
        bits = threefry.random_bits(key, sum(counts))
        starts = [sum(counts[:index]) for index in range(len(counts))]
        noises = [bits[start : start + count] for start, count in zip(starts, counts)]
    return paths, nodes, noises


def tree(paths, nodes) -> Tree:
    """The adapter tree holding `nodes[i]` at `paths[i]`."""
    out: Tree = {}
    for path, node in zip(paths, nodes):
        out = lora.set_at(out, path, node)
    return out


def map_nodes(fn, adapters, key=None, draws=None):
    """Applies `fn(nodes, noise)` to each target across adapters (noise as in `targets`)."""
    paths, nodes, noises = targets(adapters, key, draws)
    return tree(paths, [fn(target_nodes, noise) for target_nodes, noise in zip(nodes, noises)])


def factor_draws(nodes):
    """Draws a target needs for DARE on its factors: one per factor entry of every task."""
    return sum(n["lora_a"].size + n["lora_b"].size for n in nodes)


def dense_draws(nodes):
    """Draws a target needs for DARE on its dense dW: one per entry of every task."""
    return len(nodes) * nodes[0]["lora_a"].shape[0] * nodes[0]["lora_b"].shape[1]


def max_rank(adapters) -> int:
    return max(max(lora.ranks(adapter).values()) for adapter in adapters)


def adapter_node(a, b, dtype):
    return {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype), "scale": jnp.asarray(1.0, F32)}


def stack(nodes, name):
    return jnp.stack([node[name].astype(F32) for node in nodes])


def scales(nodes):
    return jnp.stack([jnp.asarray(node["scale"], F32) for node in nodes])


def deltas(nodes):
    """(n, in, out) float32 stack of `dW_i = scale_i a_i @ b_i`.

    Factors of equal rank take one batched product, written straight into the stack: stacking
    separate products copied every dense delta once more (54 of ties_delta's 250 ms on 24 ViT-B
    targets, the same bits)."""
    if len({n["lora_a"].shape for n in nodes}) == 1:
        products = mu.matmul(stack(nodes, "lora_a"), stack(nodes, "lora_b"))
        return scales(nodes)[:, None, None] * products
    return jnp.stack(
        [
            n["scale"].astype(F32) * mu.matmul(n["lora_a"].astype(F32), n["lora_b"].astype(F32))
            for n in nodes
        ]
    )


def stacked_a(nodes):
    """`[a_1, ..., a_n]` (in, sum r_i): its span holds the column space of every dW_i, so it is
    where a truncated SVD of a combination of pruned dW_i starts looking."""
    return jnp.concatenate([node["lora_a"].astype(F32) for node in nodes], 1)


def weighted_factors(nodes, weights):
    """`a_cat = [w_1 s_1 a_1, ..., w_n s_n a_n]` (in, R) and `b_cat = [b_1; ...; b_n]` (R, out),
    so that `a_cat @ b_cat = sum_i w_i dW_i`."""
    coefficients = weights * scales(nodes)
    a = jnp.concatenate([c * n["lora_a"].astype(F32) for c, n in zip(coefficients, nodes)], 1)
    b = jnp.concatenate([n["lora_b"].astype(F32) for n in nodes], 0)
    return a, b


def factored_node(triplet, rank, svd_clamp, dtype):
    """An adapter node from an SVD `(u, s, vh)`: rank-r factors, optionally clamped."""
    a, b = fz.truncate(*triplet, rank)
    if svd_clamp is not None:
        a, b = fz.clamp_factors(a, b, svd_clamp)
    return adapter_node(a, b, dtype)


def dense_output(adapters, paths, nodes, deltas, output, rank):
    """The result tree of dense (in, out) float32 `deltas`, one per target: `{"delta": dW}`
    nodes (output="delta"), or rank-`rank` factors (default: the largest input rank) of their
    leading SVD found from each target's stacked `lora_a` (output="factored", `fz.top_svds`)."""
    dtypes = [n[0]["lora_a"].dtype for n in nodes]
    if output == "delta":
        return tree(paths, [{"delta": d.astype(t)} for d, t in zip(deltas, dtypes)])
    rank = rank or max_rank(adapters)
    triplets = fz.top_svds(list(deltas), [stacked_a(n) for n in nodes], rank)
    return tree(paths, [factored_node(tr, rank, None, t) for tr, t in zip(triplets, dtypes)])
