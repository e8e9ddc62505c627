"""Merging LoRA adapters: a registry of methods, each a pure jitted function on adapter trees.

    merged = merge([adapter_1, adapter_2], "ties", [0.7, 0.3], density=0.5)
    params = lora.fold_into_base(base, merged)

Two families share the registry `METHODS`:

* `merge_peft`: PEFT's `add_weighted_adapter` (PEFT 0.21 names, parameters and numerics):
  `cat`, `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and the SVD variants
  `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`. The result is an
  adapter whose `scale` is 1.0 (PEFT gives the new adapter `lora_alpha = r`). As in PEFT, a
  single adapter is always merged with `linear`.
* `merge_delta`: methods from the merging literature, on `dW_i = scale_i a_i @ b_i`:
  `task_arithmetic`, `ties_delta`, `dare_delta`, `breadcrumbs`, `knots`. Their `output` is
  "delta" (a delta tree of `{"delta": dW}` nodes) or "factored" (an adapter of rank `rank`,
  by default the largest input rank, `scale` 1.0, from a truncated SVD).

This module holds the registry, `merge` and the validation of its inputs; `merge_targets` the
per-target plumbing; `merge_utils` and `factorize` the array maths.

Inputs are factored adapters (`{"lora_a", "lora_b", "scale"}` nodes) over the same targets and
base shapes. Maths runs in float32; factors and deltas come back in the inputs' dtype. SVD
results carry their singular values in `lora_b` and a fixed sign convention
(`factorize.canonical_signs`), so they are reproducible; PEFT keeps LAPACK's arbitrary signs,
which only matters with `svd_clamp` (the clamp quantile is taken over signed entries).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import lora

Tree = Any
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered method: `fn(adapters, weights, key, **params) -> tree` and its needs."""

    name: str
    fn: Callable[..., Tree]
    params: dict[str, Any]  # keyword name -> default (inspect.Parameter.empty if required)
    equal_ranks: bool
    needs_key: bool
    peft: bool
    jitted: Callable[..., Tree]


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, equal_ranks: bool = False, needs_key: bool = False, peft: bool = False):
    """Registers `fn(adapters, weights, key, *, **params)` under `name`, jitted with every
    keyword-only parameter static (they set shapes and branches); weights and key are traced."""

    def decorate(fn):
        signature = inspect.signature(fn).parameters.values()
        params = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
        jitted = jax.jit(fn, static_argnames=tuple(params))
        METHODS[name] = MergeMethod(name, fn, params, equal_ranks, needs_key, peft, jitted)
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
      adapters: factored adapter trees over the same targets and base shapes.
      method: a name in `METHODS`.
      weights: one weight per adapter (default all 1.0); may be a traced array.
      key: a `jax.random` key, required by the DARE methods.
      **params: the method's keyword parameters (see its docstring).

    Returns:
      A new adapter tree, or a delta tree for delta-space methods with output="delta".

    Raises:
      ValueError: naming the field, the bad value and what is allowed.
    """
    spec, weights, params = validate(adapters, method, weights, key, params)
    if spec.peft and len(adapters) == 1:
        spec, params = METHODS["linear"], {}  # PEFT's rule: one adapter is merged linearly
    return spec.jitted(list(adapters), weights, key, **params)


# ----------------------------------------------------------------------------- validation


def _check_choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field}: got {value!r}; allowed: one of {list(allowed)}")


def _check_rank(field, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{field}: got {value!r}; allowed: None or an integer >= 1")


def _check_density(field, value):
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{field}: got {value!r}; allowed: a number in (0, 1]")


def _check_fraction(field, value):
    if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
        raise ValueError(f"{field}: got {value!r}; allowed: None or a number in [0, 1]")


def _check_number(field, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{field}: got {value!r}; allowed: a real number")


_PARAM_CHECKS = {
    "density": _check_density,
    "majority_sign_method": lambda f, v: _check_choice(f, v, ("total", "frequency")),
    "svd_rank": _check_rank,
    "svd_clamp": _check_fraction,
    "rank": _check_rank,
    "output": lambda f, v: _check_choice(f, v, ("delta", "factored")),
    "combine": lambda f, v: _check_choice(f, v, ("ties", "task_arithmetic")),
    "gamma": _check_fraction,
    "scale": _check_number,
}


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


def validate(adapters, method, weights, key, params):
    """Checks a `merge` call; returns (method spec, float32 weights, params with defaults)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: one of {sorted(METHODS)}")
    spec = METHODS[method]
    _check_adapters(adapters, spec.equal_ranks, method)
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
        if name in _PARAM_CHECKS:
            _PARAM_CHECKS[name](name, value)
    if "gamma" in full and full["gamma"] + full["density"] > 1.0:
        raise ValueError(
            f"gamma: got gamma={full['gamma']} with density={full['density']}; allowed: "
            f"gamma + density <= 1"
        )
    if spec.needs_key and key is None:
        raise ValueError(f"key: method {method!r} draws random masks; pass key=jax.random.key(0)")
    n = len(adapters)
    weights = jnp.ones((n,), F32) if weights is None else jnp.asarray(weights, F32)
    if weights.shape != (n,):
        raise ValueError(
            f"weights: got shape {weights.shape}; allowed: one weight per adapter, shape ({n},)"
        )
    return spec, weights, full


# The methods register themselves on import (PEFT's first, so `METHODS` lists them first).
from jaxmerge import merge_peft  # noqa: E402, F401, I001
from jaxmerge import merge_delta  # noqa: E402, F401, I001
