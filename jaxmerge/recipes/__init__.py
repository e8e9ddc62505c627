"""Every way of merging trained runs, by name (`recipes.names()`): the fixed methods of
`merging.METHODS`, and recipes that read images of each task (learned merges, RegMean).

    runs = [jaxmerge.runs.load(d) for d in ("W/adapters/digits", "W/adapters/textures")]
    model, base = jaxmerge.runs.base_of(runs)
    merged, record = recipes.merge_runs(runs, model, base, "ties", [0.5, 0.5], {"density": 0.5})
    merged, record = recipes.merge_runs(runs, model, base, "learned_output_match")
    backbone = jaxmerge.lora.fold_into_base(base, merged)

Each recipe says which images it reads (`Recipe.reads`: "none", "unlabeled" or "labeled").
A new recipe is one function registered with `recipes.register` in a module of its own,
imported below.
"""

from jaxmerge.recipes.registry import (
    READS,
    RECIPES,
    Recipe,
    check,
    get,
    merge_runs,
    names,
    register,
)

# Importing the recipe modules registers them in this fixed order, whichever module of the
# package a user imports first.
# isort: off
from jaxmerge.recipes import learned
from jaxmerge.recipes import regmean  # noqa: F401
# isort: on

__all__ = [
    "READS",
    "RECIPES",
    "Recipe",
    "check",
    "get",
    "learned",
    "merge_runs",
    "names",
    "register",
]
