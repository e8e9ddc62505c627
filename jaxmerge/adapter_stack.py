"""A stack of adapters kept apart in one 'lora' tree, each switched on by a gate.

At every target the stack holds the adapters' factors side by side,

    lora_a = [s_1 a_1, ..., s_n a_n]  (in, R),   lora_b = [b_1; ...; b_n]  (R, out),

R = sum_t r_t, and `gate_expand` (n, R), the 0/1 matrix that spreads a gate per adapter over
that adapter's rank columns. A gate then picks how much of each adapter a forward adds,

    y = x W + bias + sum_t g_t (x s_t a_t) b_t,

computed as `((x @ lora_a) * (g @ gate_expand)) @ lora_b` by `models.layers.LoraDense`: the
base's matmuls once, and one skinny matmul pair of width R for every adapter together.

    stack = adapter_stack.stack([adapter_digits, adapter_textures])
    tree = adapter_stack.with_index(stack, jnp.array([0, 1, -1]))  # per example; -1: the base
    out = model.apply({"params": base, "lora": tree}, images)     # PEFT's adapter_names

`with_index` gives each example one adapter (a one-hot gate, the mixed-adapter batch),
`with_gates` one gate per adapter and target for the whole batch (a fused model's static
gates, `jaxmerge.fusion`), `with_router` a gate computed from each image by a linear router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import lora

Tree = Any
F32 = jnp.float32


def stack(adapters: Sequence[Tree], names: Sequence[str] | None = None) -> Tree:
    """The stacked tree of factored `adapters` over the union of their targets (an adapter
    that lacks a target adds nothing there, as in `lora.on_common_targets`).

    Raises:
      ValueError: for no adapters, or an adapter holding dense deltas (a merge result) rather
        than factors.
    """
    names = [f"adapters[{t}]" for t in range(len(adapters))] if names is None else list(names)
    if not adapters:
        raise ValueError("adapters: got none; allowed: one or more factored adapters")
    for name, adapter in zip(names, adapters):
        dense = [path for path, node in lora.target_items(adapter) if "lora_a" not in node]
        if dense or not lora.target_items(adapter):
            found = f"target {dense[0]!r} holds a dense delta" if dense else "no targets"
            raise ValueError(
                f"{name}: {found}; allowed: factored LoRA adapters (lora_a, lora_b, scale) at "
                "every target"
            )
    adapters = lora.on_common_targets(adapters)
    items = [dict(lora.target_items(a)) for a in adapters]
    tree: Tree = {}
    for path in items[0]:
        nodes = [it[path] for it in items]
        ranks = [n["lora_a"].shape[1] for n in nodes]
        dtype = nodes[0]["lora_a"].dtype
        a = jnp.concatenate(
            [(n["scale"] * n["lora_a"].astype(F32)).astype(dtype) for n in nodes], 1
        )
        b = jnp.concatenate([n["lora_b"].astype(dtype) for n in nodes], 0)
        expand = jnp.repeat(
            jnp.eye(len(nodes), dtype=F32),
            jnp.asarray(ranks),
            axis=1,
            total_repeat_length=sum(ranks),
        )
        node = {"lora_a": a, "lora_b": b, "scale": jnp.ones((), F32), "gate_expand": expand}
        tree = lora.set_at(tree, path, node)
    return tree


def size(stacked: Tree) -> int:
    """The number of adapters in a stack."""
    return lora.target_items(stacked)[0][1]["gate_expand"].shape[0]


def paths(stacked: Tree) -> tuple[str, ...]:
    """The stack's target paths, in sorted order (the keys of `with_gates`' gates)."""
    return tuple(path for path, _ in lora.target_items(stacked))


def check_stack(stacked: Tree, name: str = "stack") -> None:
    """Raises ValueError unless every target of `stacked` is a node made by `stack`."""
    items = lora.target_items(stacked)
    missing = [p for p, n in items if "gate_expand" not in n]
    if not items or missing:
        raise ValueError(
            f"{name}: target {missing[0] if missing else None!r} has no gate_expand; allowed: a "
            "tree made by adapter_stack.stack"
        )


def with_index(stacked: Tree, index: jax.Array) -> Tree:
    """The stack with example b using adapter `index[b]` alone (-1: none, the base only):
    the gate of example b is the one-hot row of `index[b]`.

    Args:
      stacked: a tree from `stack`.
      index: (B,) integers in [-1, n), one per example of the batch the tree is applied to.
    """
    index = jnp.asarray(index)
    one_hot = jax.nn.one_hot(index, size(stacked), dtype=F32)  # -1 gives a row of zeros
    return lora.map_targets(lambda node: {**node, "gate": one_hot @ node["gate_expand"]}, stacked)


def with_gates(stacked: Tree, gates: Mapping[str, jax.Array] | jax.Array) -> Tree:
    """The stack with gate g_{l,t} on adapter t at target l, the same for every example.

    Args:
      gates: {target path: (n,)}, or one (n,) array for every target.
    """

    def spread(path, node):  # an adapter's gate over each of its rank columns
        gate = gates if not isinstance(gates, Mapping) else gates[path]
        return jnp.asarray(gate, F32) @ node["gate_expand"]

    return with_rank_gates(stacked, {p: spread(p, n) for p, n in lora.target_items(stacked)})


def with_rank_gates(stacked: Tree, gates: Mapping[str, jax.Array]) -> Tree:
    """The stack with a gate on every rank column (R,) at each target, the same for every
    example: finer than `with_gates`, whose gate spans all of an adapter's columns."""
    tree: Tree = {}
    for path, node in lora.target_items(stacked):
        tree = lora.set_at(tree, path, {**node, "gate": jnp.asarray(gates[path], F32)})
    return tree


def with_router(stacked: Tree, router: Mapping[str, Mapping[str, jax.Array]]) -> Tree:
    """The stack with a gate per image from a linear router at every target l,

        g_l(x) = mean_tokens(x_l) @ kernel_l + bias_l   (n,),

    x_l the layer's input. `router` is {target path: {"kernel": (in, n), "bias": (n,)}}; with
    a "table" (n, R) too it is a mixture router, a gate per rank column,

        g_l(x) = softmax(mean_tokens(x_l) @ kernel_l + bias_l) @ table_l   (R,),

    row d of the table the gates of an image the router takes for task d.
    """
    tree: Tree = {}
    for path, node in lora.target_items(stacked):
        weights = router[path]
        node = {**node, "router_kernel": weights["kernel"], "router_bias": weights["bias"]}
        if "table" in weights:
            node["router_table"] = weights["table"]
        tree = lora.set_at(tree, path, node)
    return tree


def fold_gates(stacked_with_gates: Tree) -> Tree:
    """Plain factored adapter of a stack with static gates (`with_gates`): `a * gate` at
    every target, the same function, which `lora.fold_into_base` folds into one matrix."""

    def folded(node):
        if "router_kernel" in node or node["gate"].ndim != 1:
            raise ValueError(
                "fold_gates: a target has a per-example gate or a router; allowed: a stack "
                "with static gates (adapter_stack.with_gates), which is the same for every image"
            )
        a = (node["lora_a"].astype(F32) * node["gate"]).astype(node["lora_a"].dtype)
        return {"lora_a": a, "lora_b": node["lora_b"], "scale": node["scale"]}

    return lora.map_targets(folded, stacked_with_gates)
