"""Evaluate trained runs: one adapter, several side by side, or several merged into one backbone.

    python -m jaxmerge.evaluate --run W/adapters/digits --run W/adapters/textures \
        --merge ties --weights 0.5,0.5 --merge_param density=0.5 --output merged.json
    python -m jaxmerge.evaluate --run W/adapters/digits --run W/adapters/textures \
        --merge learned_output_match --output learned.json

Each task is scored with its own head (heads are never merged). With `--merge`, the adapters
are merged with a recipe of `jaxmerge.recipes` (a fixed method, or one that reads images of
each task's training split, as learned merges do), and folded into the
base once, so every task runs on the same backbone; each task's result then holds its single
adapter's score beside it, and the output's "merge" entry the method, its settings and (learned)
the coefficients, seconds and images used; `--no_adapter` scores each head on the bare base
(how much of a task lives in its adapter).

    python -m jaxmerge.evaluate --model models/digits_box

`--model` scores every task of a model folder (`python -m jaxmerge.merge`, merged or fused)
with its head on the folder's backbone, on the task's eval split read from `--data_dir` (the
TFDS default when not given), each beside its source run's own score where that run's
result.json is still there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import logs, lora, model_folder, recipes, scoring
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


def define_flags():
    flags.DEFINE_multi_string("run", [], "A run folder, e.g. WORKDIR/adapters/digits.")
    flags.DEFINE_string("model", None, "Instead of --run: a model folder, merged or fused.")
    flags.DEFINE_string("data_dir", "", "--model: the TFDS data folder (default: TFDS's).")
    flags.DEFINE_string(
        "merge", None, "A merge method, fixed or learned; omit to score each run alone."
    )
    flags.DEFINE_list("weights", None, "One weight per run (merge only).")
    flags.DEFINE_multi_string("merge_param", [], "name=value for the merge method.")
    flags.DEFINE_bool("no_adapter", False, "Score each head on the bare base.")
    flags.DEFINE_string("split", None, "Eval split (default: each task's eval split).")
    flags.DEFINE_string("output", None, "Write the results as JSON here.")


def main(argv):
    del argv
    args = flags.FLAGS
    if args.model is not None:
        results = _evaluate_model_flags(args)
    elif not args.run:
        raise ValueError("--run: give at least one run folder, or --model a model folder")
    else:
        results = _evaluate_run_flags(args)
    if not logs.is_writer():  # multi-host: process 0 writes and prints the results
        return
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
    if "coefficients" in results.get("merge", {}):  # hundreds of numbers: in --output only
        results["merge"] = {**results["merge"], "coefficients": "(in --output)"}
    print(json.dumps(results, indent=2))


def _evaluate_model_flags(args):
    """`--model`: the merge flags and --run have no place beside it."""
    given = [("--run", args.run), ("--merge", args.merge), ("--weights", args.weights)]
    given += [("--merge_param", args.merge_param), ("--no_adapter", args.no_adapter or None)]
    for flag, value in given:
        if value:
            raise ValueError(
                f"{flag}: got {value!r} with --model; allowed: --model alone (a model folder "
                f"is already merged or fused)"
            )
    return evaluate_model(args.model, args.split, args.data_dir)


def _evaluate_run_flags(args):
    weights = [float(w) for w in args.weights] if args.weights else None
    return evaluate_runs(
        args.run,
        args.merge,
        weights,
        dict(cli_lib.parse_param(p) for p in args.merge_param),
        args.no_adapter,
        args.split,
    )


def cli():
    cli_lib.run(main, define_flags, distributed=True)


if __name__ == "__main__":
    cli()
