"""The one name list of every way of merging trained runs: `get`, `names` and `merge_runs`.

A recipe takes the runs (their adapters, heads and tasks), the model and base they were trained
on and its settings, and returns the merged adapter tree and a JSON record of what it did. Fixed
methods of `merging.METHODS` are recipes by their own names (a view, so a method registered
later is found too); recipes that read images (learned merges, RegMean) register here with the
kind of images they read. `evaluate --merge`, `merge --method`, the study and its report find
every way of merging through this module alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxmerge import lapack, merging
from jaxmerge import runs as runs_lib

Tree = Any
READS = ("none", "unlabeled", "labeled")  # the images a recipe reads from each task


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named way of merging runs.

    `check(params)` returns the full settings (defaults filled in) or raises ValueError;
    `run(runs, model_def, base, weights, settings, seed, cache)` returns (merged tree, record
    of the recipe's own fields: coefficients, images used, ...).
    """

    name: str
    reads: str
    takes_weights: bool  # fixed methods take one weight per run; fitted recipes find their own
    check: Callable[[Mapping[str, Any]], dict[str, Any]]
    run: Callable[..., tuple[Tree, dict[str, Any]]]
    about: str


RECIPES: dict[str, Recipe] = {}


def register(name: str, *, reads: str, check: Callable, about: str, takes_weights: bool = False):
    """Registers `run(runs, model_def, base, weights, settings, seed, cache) -> (tree, record)`
    under `name`, with `check(params) -> settings` run before anything loads or computes."""
    if reads not in READS:
        raise ValueError(f"recipe {name!r}: reads={reads!r}; allowed: one of {list(READS)}")

    def decorate(run):
        if name in RECIPES or name in merging.METHODS:
            raise ValueError(f"merge recipe {name!r} is registered twice")
        RECIPES[name] = Recipe(name, reads, takes_weights, check, run, about)
        return run

    return decorate


def _fixed(method: str) -> Recipe:
    """The recipe of a fixed method: `merging.merge` on the runs' adapters (key from seed)."""

    def check(params):
        return merging.registry.check_params(method, dict(params))

    def run(runs, model_def, base, weights, settings, seed, cache):
        del model_def, base, cache
        adapters = [r.adapter for r in runs]
        key = jax.random.key(seed)
        return merging.merge(adapters, method, weights, key=key, **settings), {}

    about = (merging.METHODS[method].doc or "").strip().split("\n")[0]
    return Recipe(method, "none", True, check, run, about)


def names() -> list[str]:
    """Every recipe name: the fixed methods (in `merging.METHODS` order), then the others."""
    return [*merging.METHODS, *RECIPES]


def get(name: str) -> Recipe:
    """The recipe called `name`; ValueError listing every name otherwise."""
    if name in RECIPES:
        return RECIPES[name]
    if name in merging.METHODS:
        return _fixed(name)
    raise ValueError(f"method: got {name!r}; allowed: one of {sorted(names())}")


def check(name: str, params: Mapping[str, Any] | None = None, weights=None) -> dict[str, Any]:
    """The full settings of recipe `name` for `params`, checked before any run is loaded."""
    recipe = get(name)
    if weights is not None and not recipe.takes_weights:
        raise ValueError(f"weights: method {name!r} fits its own weights; drop them")
    return recipe.check(dict(params or {}))


def merge_runs(
    runs: Sequence[Any],
    model_def,
    base: Tree,
    name: str,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    cache: dict | None = None,
) -> tuple[Tree, dict[str, Any]]:
    """Merges the runs' adapters with recipe `name`.

    Args:
      runs: loaded runs with adapters, one per task, on one base.
      model_def, base: the model and base parameters they were trained on.
      name: a name of `names()`; `params` are its settings.
      weights: one weight per run, fixed methods only (default all 1.0).
      seed: random masks (DARE) and the images a recipe reads.
      cache: a dict reused across calls (e.g. every merge of a study seed) for what does not
        depend on the combination: each task's images and single-adapter outputs.

    Returns:
      (merged tree for `lora.fold_into_base`, record): the method, weights, params, seed, the
      images it read ("reads"), its seconds, and under "learned" the recipe's own record (None
      for fixed methods), from which the merge can be rebuilt.
    """
    recipe = get(name)
    settings = check(name, params, weights)
    runs_lib.check_one_model(runs)  # one model computes every run's merge
    cache = {} if cache is None else cache
    start = time.perf_counter()
    with lapack.single_threaded():  # see jaxmerge/lapack.py
        merged, own = recipe.run(runs, model_def, base, weights, settings, seed, cache)
        merged = jax.block_until_ready(merged)
    record = {
        "method": name,
        "weights": None if weights is None else [float(w) for w in weights],
        "params": dict(params or {}),
        "seed": seed,
        "reads": recipe.reads,
        "seconds": round(time.perf_counter() - start, 3),
        "learned": own or None,
    }
    return merged, record
