"""The registry of merge methods, `merge()` and the validation of its inputs.

A method is one function registered by name with the checks of its own keyword parameters;
`merge` validates every input against them before anything is traced.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lapack, lora

Tree = Any


Check = Callable[[str, Any], None]  # check(field, value) raises ValueError naming both


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered method: its jitted `fn(adapters, weights, key, **params) -> tree` and needs."""

    name: str
    params: dict[str, Any]  # keyword name -> default (inspect.Parameter.empty if required)
    checks: dict[str, Check]  # keyword name -> its check
    check_together: Callable[[dict[str, Any]], None] | None  # constraints across parameters
    equal_ranks: bool
    needs_key: bool
    peft: bool
    jitted: Callable[..., Tree]
    doc: str = ""  # the method's docstring: its paper and formula


METHODS: dict[str, MergeMethod] = {}


def _with_largest_magnitudes(fn):
    """`fn` that also returns `lora.largest_magnitudes` of its inputs and of its result,
    computed in the same compiled call: checking them costs a few reductions, not extra
    dispatches."""

    def checked(adapters, weights, key, **params):
        merged = fn(adapters, weights, key, **params)
        return merged, lora.largest_magnitudes([*adapters, merged])

    return checked


def register(
    name: str,
    *,
    checks: dict[str, Check] | None = None,
    check_together: Callable[[dict[str, Any]], None] | None = None,
    equal_ranks: bool = False,
    needs_key: bool = False,
    peft: bool = False,
):
    """Registers `fn(adapters, weights, key, *, **params)` under `name`, jitted with every
    keyword-only parameter static (they set shapes and branches); weights and key are traced.

    Args:
      checks: one check per keyword parameter (e.g. `{"density": density}`); a parameter
        without one is refused here, so no user value ever reaches a method unchecked.
      check_together: called with every parameter (defaults filled in) after `checks`.
      equal_ranks: the method needs every adapter to have the same rank per target.
      needs_key: the method draws random masks and needs `key`.
      peft: a PEFT `add_weighted_adapter` method (one adapter is then merged with `linear`).
    """
    checks = dict(checks or {})

    def decorate(fn):
        signature = inspect.signature(fn).parameters.values()
        params = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        if params.keys() != checks.keys():
            raise ValueError(
                f"merge method {name!r}: parameters {sorted(params)} need exactly one check "
                f"each; checks given for {sorted(checks)}"
            )
        jitted = jax.jit(_with_largest_magnitudes(fn), static_argnames=tuple(params))
        METHODS[name] = MergeMethod(
            name, params, checks, check_together, equal_ranks, needs_key, peft, jitted, fn.__doc__
        )
        return fn

    return decorate


def merge(
    adapters: Sequence[Tree],
    method: str,
    weights: Sequence[float] | jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    **params: Any,
) -> Tree:
    """Merges adapters with a registered method after validating every input.

    Args:
      adapters: factored adapter trees over the same base; where one lacks a target another
        adapts, it counts as zero there (`lora.on_common_targets`).
      method: a name in `METHODS`.
      weights: one weight per adapter (default all 1.0); may be a traced array.
      key: a `jax.random` key, required by the DARE methods.
      **params: the method's keyword parameters (see its docstring).

    Returns:
      A new adapter tree, or a delta tree for delta-space methods with output="delta".

    Raises:
      ValueError: naming the field, the bad value and what is allowed; an adapter (or the
        result) holding NaN or inf, naming the adapter and the target.
    """
    adapters = lora.on_common_targets(adapters)  # an adapter adds nothing where it has no target
    spec, weights, params = validate(adapters, method, weights, key, params)
    if spec.peft and len(adapters) == 1:
        spec, params = METHODS["linear"], {}  # PEFT's rule: one adapter is merged linearly
    with lapack.single_threaded():  # its QRs and SVDs are small: see jaxmerge/lapack.py
        merged, magnitudes = spec.jitted(list(adapters), weights, key, **params)
        if isinstance(magnitudes, jax.core.Tracer):  # merge called inside the user's own jit
            return merged
        magnitudes = jax.device_get(magnitudes)
    if np.isfinite(magnitudes).all():
        return merged
    start = 0  # name the first adapter (or the result) and target holding NaN or inf
    for index, adapter in enumerate(adapters):
        count = len(lora.leaf_items(adapter))
        lora.raise_if_not_finite(adapter, magnitudes[start : start + count], f"adapters[{index}]")
        start += count
    # Finite inputs with finite weights can still overflow (e.g. huge weights): say so too.
    lora.raise_if_not_finite(merged, magnitudes[start:], f"merge result of {method!r}")
    return merged


# ----------------------------------------------------------------------------- parameter checks


def choice(*allowed: Any) -> Check:
    """A check that the value is one of `allowed`."""

    def check(field, value):
        if value not in allowed:
            raise ValueError(f"{field}: got {value!r}; allowed: one of {list(allowed)}")

    return check


def rank(field, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{field}: got {value!r}; allowed: None or an integer >= 1")


def density(field, value):
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{field}: got {value!r}; allowed: a number in (0, 1]")


def fraction(field, value):
    if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
        raise ValueError(f"{field}: got {value!r}; allowed: None or a number in [0, 1]")


def proportion(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field}: got {value!r}; allowed: a number in [0, 1]")


def number(field, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{field}: got {value!r}; allowed: a real number")


def count(field, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 0")


def positive(field, value):
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{field}: got {value!r}; allowed: a finite number > 0")


SIGN_METHOD = choice("total", "frequency")
OUTPUT = choice("delta", "factored")


# ----------------------------------------------------------------------------- validation


def _check_adapters(adapters, equal_ranks: bool, method: str) -> None:
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters: got {adapters!r:.60}; allowed: a non-empty list of adapters")
    layouts = []
    for index, adapter in enumerate(adapters):
        items = lora.target_items(adapter)
        if not items:
            raise ValueError(f"adapters[{index}]: has no LoRA target nodes")
        layout = {}
        for path, node in items:
            if not all(name in node for name in lora.FACTORS):
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has keys {sorted(node)}; allowed: "
                    f"factored nodes with keys {list(lora.FACTORS)}"
                )
            a, b = node["lora_a"], node["lora_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has lora_a {a.shape} and lora_b "
                    f"{b.shape}; allowed: shapes (in, r) and (r, out)"
                )
            layout[path] = (a.shape[0], b.shape[1], a.shape[1])
        layouts.append(layout)
    first = layouts[0]
    for index, layout in enumerate(layouts[1:], 1):
        if layout.keys() != first.keys():
            missing, extra = sorted(first.keys() - layout), sorted(layout.keys() - first)
            raise ValueError(
                f"adapters[{index}]: targets differ from adapters[0]'s (missing {missing}, extra "
                f"{extra}); allowed: adapters of the same layers"
            )
        for path, (fan_in, fan_out, rank) in layout.items():
            if (fan_in, fan_out) != first[path][:2]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has base shape {(fan_in, fan_out)}, "
                    f"adapters[0] has {first[path][:2]}; allowed: the same base shapes"
                )
            if equal_ranks and rank != first[path][2]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has rank {rank}, adapters[0] has "
                    f"{first[path][2]}; method {method!r} needs equal ranks (use 'cat' or an "
                    f"'*svd' method for unequal ranks)"
                )


def _nodes_by_target(adapters):
    """Per target (in sorted path order), its node in every adapter."""
    items = [lora.target_items(adapter) for adapter in adapters]
    return [[node for _, node in nodes] for nodes in zip(*items)]


def _check_output_rank(adapters, params) -> None:
    """A truncated SVD cannot return more directions than any adapted layer has: a rank above
    every layer's smaller side is refused. (Above one layer's side, or above the summed input
    rank, the factors are padded with zeros: one rank serves layers of different shapes.)"""
    for field in ("svd_rank", "rank"):
        value = params.get(field)
        if value is None or (field == "rank" and params.get("output") != "factored"):
            continue
        limit = max(min(lora.delta_shape(nodes[0])) for nodes in _nodes_by_target(adapters))
        if value > limit:
            raise ValueError(
                f"{field}: got {value}; allowed: at most {limit} (the largest adapted layer's "
                f"smaller side; more would only pad with zeros)"
            )


def check_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters with defaults filled in, each checked (no adapter needed)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: one of {sorted(METHODS)}")
    spec = METHODS[method]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(
            f"params: method {method!r} got unknown parameter(s) {unknown}; allowed: "
            f"{sorted(spec.params)}"
        )
    full = {**spec.params, **params}
    for name, value in full.items():
        if value is inspect.Parameter.empty:
            raise ValueError(f"{name}: method {method!r} needs {name}=...; none was given")
        spec.checks[name](name, value)
    if spec.check_together is not None:
        spec.check_together(full)
    return full


def validate(adapters, method, weights, key, params):
    """Checks a `merge` call; returns (method spec, float32 weights, params with defaults)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: one of {sorted(METHODS)}")
    spec = METHODS[method]
    _check_adapters(adapters, spec.equal_ranks, method)
    full = check_params(method, params)
    _check_output_rank(adapters, full)
    if spec.needs_key and key is None:
        raise ValueError(f"key: method {method!r} draws random masks; pass key=jax.random.key(0)")
    n = len(adapters)
    weights = np.ones((n,), np.float32) if weights is None else weights
    # Concrete weights are checked in numpy: two eager jax ops would cost a small merge 5%.
    traced = any(isinstance(w, jax.core.Tracer) for w in jax.tree.leaves(weights))
    weights = (jnp if traced else np).asarray(weights, np.float32)
    if weights.shape != (n,):
        raise ValueError(
            f"weights: got shape {weights.shape}; allowed: one weight per adapter, shape ({n},)"
        )
    if not traced and not np.isfinite(weights).all():
        raise ValueError(f"weights: got {weights.tolist()}; allowed: finite numbers")
    return spec, weights, full
