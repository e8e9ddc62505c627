"""Scoring trained runs and model folders: each run alone, merged into one backbone, or on the
bare base; every task of a model folder.

Each task is scored with its own head (heads are never merged). `evaluate_runs` with a merge
method merges the adapters with a recipe of `jaxmerge.recipes` (a fixed method, or one that
reads images of each task's training split, as learned merges do) and folds them into the base
once, so every task runs on the same backbone; each task's result then holds its single
adapter's score beside it, and the "merge" entry the method, its settings and (learned) the
coefficients, seconds and images used. `evaluate_model` scores every task of a model folder
on the folder's backbone, each beside its source run's own score where that run's result.json
is still there. `python -m jaxmerge evaluate` is the command over both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jaxmerge import lora, model_folder, recipes, scoring
from jaxmerge import runs as runs_lib

Tree = Any


def score(run: runs_lib.Run, model_def, backbone: Tree, split: str | None = None):
    """Metrics of `run.task` with the run's head on `backbone` (base params, adapter folded)."""
    return scoring.run_scorer(run, model_def, split)(backbone, run.head)


def evaluate_runs(
    directories: Sequence[str],
    method: str | None = None,
    weights: Sequence[float] | None = None,
    merge_params: dict[str, Any] | None = None,
    no_adapter: bool = False,
    split: str | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{task: metrics} for the runs: each with its own adapter, merged, or without adapter.

    A task given twice (e.g. its adapter and its head-finetuning run) is keyed "task:mode".
    """
    if method is not None:
        recipes.check(method, merge_params, weights)
    runs = [runs_lib.load(d) for d in directories]
    if method is not None and any(run.adapter is None for run in runs):
        raise ValueError(
            "--merge needs LoRA runs (workdir/adapters/<task>); a head run has no adapter"
        )
    model_def, base = runs_lib.base_of(runs)
    about_merge = None
    if method is not None:
        merged, about_merge = recipes.merge_runs(
            runs, model_def, base, method, weights, merge_params, seed
        )
    if method is not None:
        backbones = [lora.fold_into_base(base, merged)] * len(runs)
    elif no_adapter:
        backbones = [base] * len(runs)
    else:
        backbones = [_own_backbone(r, base) for r in runs]
    names = [run.task.name for run in runs]
    # The same task twice (an adapter beside its head baseline) is told apart by the run's mode.
    keys = [f"{n}:{r.config.mode}" if names.count(n) > 1 else n for n, r in zip(names, runs)]
    results = {key: score(run, model_def, b, split) for key, run, b in zip(keys, runs, backbones)}
    if about_merge is not None:
        for key, run in zip(keys, runs):  # each task's score beside its single adapter's
            results[key]["single_adapter"] = _own_result(run.directory)
        results["merge"] = about_merge
    return results


def evaluate_model(
    folder: str, split: str | None = None, data_dir: str = ""
) -> dict[str, dict[str, Any]]:
    """{task: metrics} of every task of a model folder, merged or fused (its gated adapters
    on the base), each beside its source run's own result ("single_adapter") where found;
    "model": the folder, its format and its method or gating."""
    model = model_folder.load(folder)
    info = model.info
    settings = model_folder.data_settings(info, data_dir)
    family = info["model"]["family"]
    results: dict[str, dict[str, Any]] = {}
    for name in model.tasks:
        task = model_folder.task_of(info, name)
        head_def = model.head_defs[name]
        scorer = scoring.Scorer(task, head_def, model.model_def, settings, split, family)
        results[name] = scorer(model.backbone, model.head_params[name], model.lora)
    recipe = info.get("fusion") or info.get("merge") or {}
    for source in recipe.get("runs", []):
        if source["task"] in results:
            results[source["task"]]["single_adapter"] = _own_result(source["path"])
    how = {"fuse": recipe["gating"]} if "fusion" in info else {"method": recipe.get("method")}
    results["model"] = {"folder": os.path.abspath(folder), "format": info["format"], **how}
    return results


def _own_backbone(run: runs_lib.Run, base: Tree) -> Tree:
    """The backbone a run was trained to use: base + its adapter, its own trained copy (mode
    "full"), or the base (head finetuning)."""
    if run.trained_base is not None:
        return run.trained_base
    return base if run.adapter is None else lora.fold_into_base(base, run.adapter)


def _own_result(directory: str) -> dict[str, float] | None:
    """A run folder's own final evaluation (its result.json), or None if it has none."""
    path = os.path.join(directory, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return {k: v for k, v in result.items() if isinstance(v, float)}
