"""LoRA adapters as pytrees that mirror the base parameter paths.

An adapter is a nested dict shaped like the base parameters, holding at each adapted dense layer
(a *target*) the factors of a low-rank update:

    {"block_0": {"attention": {"query": {"lora_a": (in, r), "lora_b": (r, out), "scale": ()}}}}

so `dW = scale * lora_a @ lora_b` has the layout of that layer's `kernel` (in, out). A *delta
tree* holds `{"delta": dW}` in place of the factors; both kinds are valid 'lora' collections for
`ViT.apply`. The base parameters are never modified: every function returns new trees.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Tree = Any
FACTORS = ("lora_a", "lora_b", "scale")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which dense layers get an adapter, with which rank and scaling.

    Attributes:
      rank: r, the inner dimension of the update.
      alpha: scaling numerator; the update is scaled by alpha / r, or alpha / sqrt(r) with
        `use_rslora` (Kalajdzievski 2023), as in PEFT.
      targets: a regex searched in each target path (default: the query and value layers of
        every block). A model family resolves its preset names ("qv", "all") to one:
        `models.get(family).target_regex("qv")`, as `config_lib.lora_config` does.
      rank_pattern, alpha_pattern: {regex: value} overriding rank / alpha on matching paths;
        the first regex that matches (searched, as PEFT does) wins.
      dropout: dropout on the LoRA branch's input during training.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str = r"block_\d+/attention/(query|value)$"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        for name, value in [
            ("rank", self.rank),
            *(("rank_pattern", v) for v in self.rank_pattern.values()),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoraConfig.{name}: got {value!r}; allowed: an integer >= 1")
        for name, value in [
            ("alpha", self.alpha),
            *(("alpha_pattern", v) for v in self.alpha_pattern.values()),
        ]:
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LoraConfig.{name}: got {value!r}; allowed: a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout: got {self.dropout!r}; allowed: 0 <= dropout < 1")
        for pattern in [self.targets, *self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"LoraConfig: bad regex {pattern!r}: {error}") from None

    def rank_for(self, path: str) -> int:
        return next((r for p, r in self.rank_pattern.items() if re.search(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        return next((a for p, a in self.alpha_pattern.items() if re.search(p, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        rank, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


# ----------------------------------------------------------------------------- tree helpers


def is_target(node: Any) -> bool:
    """True for an adapter leaf node: a dict of LoRA factors or of a dense delta."""
    return isinstance(node, Mapping) and ("lora_a" in node or "delta" in node)


def target_items(tree: Tree, prefix: str = "") -> list[tuple[str, Mapping]]:
    """[(path, node)] for every target node of an adapter or delta tree, in sorted path order."""
    if is_target(tree):
        return [(prefix, tree)]
    if not isinstance(tree, Mapping):
        return []
    items = []
    for name in sorted(tree):
        items += target_items(tree[name], f"{prefix}/{name}" if prefix else name)
    return items


def map_targets(fn: Callable[..., Any], *trees: Tree) -> Tree:
    """Applies fn(node_1, ..., node_n) to the matching target nodes of trees of equal layout."""
    first = trees[0]
    if is_target(first):
        return fn(*trees)
    return {name: map_targets(fn, *(t[name] for t in trees)) for name in first}


def set_at(tree: Tree, path: str, value: Any) -> Tree:
    """A copy of the nested dict `tree` with `value` at the '/'-separated `path`."""
    head, _, rest = path.partition("/")
    new = dict(tree)
    new[head] = set_at(tree.get(head, {}), rest, value) if rest else value
    return new


def on_common_targets(adapters: Sequence[Tree]) -> list[Tree]:
    """Every adapter over the union of the adapters' targets: where one lacks a target that
    another adapts, it gets zero factors (or a zero delta) of the other's shapes there, so it
    adds nothing at that layer, as PEFT's `add_weighted_adapter` skips a module an adapter
    does not adapt. Adapters that share their targets are returned as they are."""
    items = [dict(target_items(adapter)) for adapter in adapters]
    union = sorted(set().union(*items))
    if all(len(found) == len(union) for found in items):
        return list(adapters)
    padded = []
    for adapter, found in zip(adapters, items):
        for path in union:
            if path not in found:
                like = next(other[path] for other in items if path in other)
                adapter = set_at(adapter, path, {k: jnp.zeros_like(v) for k, v in like.items()})
        padded.append(adapter)
    return padded


def get_at(tree: Tree, path: str) -> Any:
    for name in path.split("/"):
        tree = tree[name]
    return tree


def kernel_paths(base: Tree, prefix: str = "") -> list[str]:
    """Paths of every 2-D `kernel` in a base parameter tree (the layers LoRA can adapt)."""
    paths = []
    for name in sorted(base):
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(base[name], Mapping):
            paths += kernel_paths(base[name], path)
        elif name == "kernel" and getattr(base[name], "ndim", 0) == 2:
            paths.append(prefix)
    return paths


# ----------------------------------------------------------------------------- adapters


def init_adapter(key: jax.Array, base: Tree, config: LoraConfig, dtype=jnp.float32) -> Tree:
    """A new adapter for `base`: PEFT's default initialisation, so it starts as a no-op.

    lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5), as torch's Linear and
    PEFT use), lora_b = 0, scale = alpha/r (or alpha/sqrt(r) with rsLoRA).

    Raises:
      ValueError: if the target regex matches no dense layer of `base`, or a rank exceeds its
        layer's smaller side.
    """
    paths = [p for p in kernel_paths(base) if re.search(config.targets, p)]
    if not paths:
        raise ValueError(
            f"LoraConfig.targets: {config.targets!r} matches no dense layer; layer paths look "
            f"like {kernel_paths(base)[:4]} (a preset name such as 'qv' is resolved by the "
            f"model family: models.get(family).target_regex('qv'))"
        )
    adapter: Tree = {}
    for path, subkey in zip(paths, jax.random.split(key, len(paths))):
        fan_in, fan_out = get_at(base, path)["kernel"].shape
        rank, bound = config.rank_for(path), 1.0 / math.sqrt(fan_in)
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"LoraConfig.rank: got {rank} for target {path!r}; allowed: at most "
                f"min(in, out) = {min(fan_in, fan_out)} (a larger rank adds nothing)"
            )
        node = {
            "lora_a": jax.random.uniform(subkey, (fan_in, rank), dtype, -bound, bound),
            "lora_b": jnp.zeros((rank, fan_out), dtype),
            "scale": jnp.asarray(config.scale_for(path), jnp.float32),
        }
        adapter = set_at(adapter, path, node)
    return adapter


def ranks(adapter: Tree) -> dict[str, int]:
    """{target path: rank} of a factored adapter."""
    return {p: n["lora_a"].shape[-1] for p, n in target_items(adapter) if "lora_a" in n}


def delta_of(node: Mapping) -> jax.Array:
    """The (in, out) update of one target node: `scale * lora_a @ lora_b`, or its `delta`."""
    if "delta" in node:
        return node["delta"]
    if "gate_expand" in node:  # a gate would be dropped without a word
        raise ValueError(
            "adapter: a target holds a stack of gated adapters; allowed: factors or a delta "
            "(adapter_stack.fold_gates turns static gates into factors)"
        )
    product = jnp.matmul(node["lora_a"], node["lora_b"], precision=jax.lax.Precision.HIGHEST)
    return (node["scale"] * product).astype(node["lora_a"].dtype)


def delta_weights(adapter: Tree) -> Tree:
    """The delta tree of an adapter: each target node becomes `{"delta": scale * a @ b}`."""
    return map_targets(lambda node: {"delta": delta_of(node)}, adapter)


def delta_shape(node: Mapping) -> tuple[int, ...]:
    """The (in, out) shape of one target node's update, from its factors or its delta."""
    if "delta" in node:
        return tuple(node["delta"].shape)
    return (node["lora_a"].shape[0], node["lora_b"].shape[-1])


def check_against_base(adapter: Tree, base: Tree, name: str = "adapter") -> None:
    """Raises ValueError unless every target of `adapter` is a dense layer of `base` whose
    kernel has the update's shape (shapes only: no array is read, so it is free under jit).

    An adapter for a deeper model, or with misspelled paths, would otherwise be ignored by
    `ViT.apply` without a word.
    """
    for path, node in target_items(adapter):
        try:
            kernel = get_at(base, path)["kernel"]
        except (KeyError, TypeError):
            layers = kernel_paths(base)
            raise ValueError(
                f"{name} target {path!r} is not a layer of the base parameters; the base has "
                f"{len(layers)} dense layers, e.g. {layers[:3]}"
            ) from None
        if delta_shape(node) != tuple(kernel.shape):
            raise ValueError(
                f"{name} target {path!r}: update shape {delta_shape(node)} differs from the "
                f"base kernel shape {tuple(kernel.shape)}"
            )


def leaf_items(tree: Tree) -> list[tuple[str, str, Any]]:
    """(target path, key, leaf) of every leaf of every target node, in `target_items` order."""
    return [(path, key, leaf) for path, node in target_items(tree) for key, leaf in node.items()]


def largest_magnitudes(trees: Sequence[Tree]) -> jax.Array:
    """`max |x|` of every leaf of every tree, one float32 each, in `leaf_items` order: finite
    exactly where the leaf is (a NaN propagates through the max, an inf is its own max). One
    max per leaf is the cheapest exact check XLA:CPU offers: `isfinite(x).all()` costs about
    1.7x as much, and a merge pays it for every input and output leaf."""
    return jnp.stack(
        [
            jnp.max(jnp.abs(leaf), initial=0).astype(jnp.float32)
            for tree in trees
            for _, _, leaf in leaf_items(tree)
        ]
    )


_largest_magnitudes = jax.jit(largest_magnitudes)


def raise_if_not_finite(tree: Tree, magnitudes, name: str = "adapter") -> None:
    """Raises ValueError naming the first target of `tree` holding NaN or inf, from its
    `largest_magnitudes` (fetched to the host)."""
    for (path, key, _), largest in zip(leaf_items(tree), magnitudes):
        if not math.isfinite(largest):
            raise ValueError(
                f"{name} target {path!r}: {key} holds NaN or inf; allowed: finite values "
                f"(a diverged or corrupted adapter)"
            )


def check_finite(adapter: Tree, name: str = "adapter") -> None:
    """Raises ValueError naming the first target holding NaN or inf (one reduction per leaf,
    fetched together). Skipped under tracing, where values are not known."""
    items = leaf_items(adapter)
    if not items or any(isinstance(leaf, jax.core.Tracer) for _, _, leaf in items):
        return
    raise_if_not_finite(adapter, jax.device_get(_largest_magnitudes([adapter])), name)


def _apply_delta(base: Tree, adapter: Tree, sign: float) -> Tree:
    check_against_base(adapter, base)
    check_finite(adapter)
    new = base
    for path, node in target_items(adapter):
        layer = get_at(base, path)
        kernel = layer["kernel"]
        delta = delta_of(node)
        new = set_at(new, path, {**layer, "kernel": (kernel + sign * delta).astype(kernel.dtype)})
    return new


def fold_into_base(base: Tree, adapter: Tree) -> Tree:
    """New base parameters with the adapter folded in: `kernel + dW` at every target.

    Inference with the folded base costs the same as the plain ViT; `base` is left unchanged.
    """
    return _apply_delta(base, adapter, 1.0)


def unfold_from_base(folded: Tree, adapter: Tree) -> Tree:
    """The inverse of `fold_into_base`: `kernel - dW` at every target."""
    return _apply_delta(folded, adapter, -1.0)


def zeros_like_adapter(adapter: Tree) -> Tree:
    """An adapter of the same layout whose update is exactly zero (lora_b = 0)."""
    return map_targets(
        lambda n: (
            {**n, "lora_b": jnp.zeros_like(n["lora_b"])}
            if "lora_b" in n
            else {"delta": jnp.zeros_like(n["delta"])}
        ),
        adapter,
    )
