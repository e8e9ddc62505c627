r"""The paper's study end to end: train, merge every pair and triple, score, report.

    python -m experiments.study --config experiments/configs/offline.py:seeds=1 --workdir W

For each seed and task it trains a LoRA adapter and a head-finetuning baseline
(`training.train_and_evaluate`); merges every pair and every triple of adapters with each method
of `config.methods`, folds the merge into the base and scores each task of the merge with its
own head; scores each head on the bare base ("adapter removed"); measures how alike every pair
of adapters is (`jaxmerge.similarity`); then writes the report (`experiments/report/`).

Stages are cached in the workdir, so a rerun (or a resumed, interrupted one) skips what is done:
finished training runs are read from their `result.json`, merge scores from `merges.jsonl`
(keyed by seed, method and tasks), adapter-removed scores from `no_adapter.jsonl` and
similarities from `similarity.jsonl`.

Workdir layout: `seed_<s>/{adapters,heads}/<task>/` (jaxmerge run folders), the three JSONL
caches, and `report/` (tables.md, raw.jsonl, PNG plots). On multi-host runs only process 0
writes the caches and the report (`jaxmerge.logs`); every process reads them, so the workdir
must be on a filesystem they share (as Orbax's multi-host checkpoints need anyway).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence

import ml_collections
from absl import flags

from experiments import report
from jaxmerge import cli as cli_lib
from jaxmerge import (
    fuse,
    fusion,
    learned,
    logs,
    lora,
    merging,
    recipes,
    scoring,
    similarity,
    tasks,
    training,
)
from jaxmerge import run_config as run_config_lib
from jaxmerge import runs as runs_lib

MODES = ("lora", "head")


# ----------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the study config (every run config too) before anything trains."""
    if len(set(config.tasks)) != len(config.tasks) or len(config.tasks) < 2:
        raise ValueError(f"config.tasks: got {config.tasks!r}; allowed: >= 2 distinct task names")
    for name in config.tasks:
        tasks.get(name)
    if not config.seeds or any(not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ValueError(f"config.seeds: got {config.seeds!r}; allowed: integers >= 0")
    sizes = tuple(config.merge_sizes)
    if not sizes or any(not 2 <= k <= len(config.tasks) for k in sizes):
        raise ValueError(
            f"config.merge_sizes: got {sizes!r}; allowed: sizes in 2..{len(config.tasks)}"
        )
    for method in config.methods:
        if method not in recipes.names():
            raise ValueError(
                f"config.methods: unknown method {method!r}; known: {sorted(recipes.names())}"
            )
        recipes.check(method, report.method_params(config, method))
    for method, sizes in config.get("method_sizes", {}).items():
        if method not in config.methods or not set(sizes) <= set(config.merge_sizes):
            raise ValueError(
                f"config.method_sizes: {method!r}: {tuple(sizes)}; allowed: a method of "
                f"config.methods with sizes among config.merge_sizes {tuple(config.merge_sizes)}"
            )
    for method in config.get("refit_methods", ()):
        if method not in config.methods:
            raise ValueError(
                f"config.refit_methods: {method!r} is not in config.methods {list(config.methods)}"
            )
    for gating, params in config.get("fusion", {}).items():
        fuse.check(gating, dict(params))
    fusion_sizes = tuple(config.get("fusion_sizes", config.merge_sizes))
    if any(not 2 <= k <= len(config.tasks) for k in fusion_sizes):
        raise ValueError(
            f"config.fusion_sizes: got {fusion_sizes!r}; allowed: sizes in 2..{len(config.tasks)}"
        )
    if config.main_method not in config.methods:
        raise ValueError(
            f"config.main_method: got {config.main_method!r}; allowed: one of config.methods "
            f"{sorted(config.methods)}"
        )
    for name in config.tasks:
        for mode in MODES:
            run_config_lib.resolve(run_config(config, name, mode, config.seeds[0]))


def run_config(
    config: ml_collections.ConfigDict, task: str, mode: str, seed: int
) -> ml_collections.ConfigDict:
    """The training config of one run: `config.train` with its task, mode and seed."""
    run = config.train.copy_and_resolve_references()
    run.task, run.mode, run.seed = task, mode, seed
    return run


def method_sizes(config, method: str) -> tuple[int, ...]:
    """The merge sizes a method runs on: `config.merge_sizes` unless `config.method_sizes`
    narrows them (e.g. learned merges on pairs only in the quickstart)."""
    return tuple(config.get("method_sizes", {}).get(method, config.merge_sizes))


def seed_dir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed_{seed}")


def combinations(names: Sequence[str], sizes: Iterable[int]) -> list[tuple[str, ...]]:
    """Every subset of `names` of each size, in the order of `names`."""
    return [c for k in sizes for c in itertools.combinations(names, k)]


# ----------------------------------------------------------------------------- caches


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file ([] if absent); a torn last line (a kill) is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def cache_key(record: dict) -> tuple:
    return (record["seed"], record.get("method"), tuple(record["tasks"]))


# ----------------------------------------------------------------------------- training


def train_all(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains (or reads back) every run: one adapter and one head baseline per task and seed.

    Returns:
      [{"seed", "task", "mode", "result": the run's final evaluation, "seconds"}].
    """
    jobs = [(s, t, m) for s in config.seeds for t in config.tasks for m in MODES]
    records = []
    bar = logs.progress(jobs, desc="train runs", unit="run")
    for seed, task, mode in bar:
        bar.set_postfix_str(f"seed {seed} {mode}:{task}")
        directory = training.run_dir(seed_dir(workdir, seed), mode, task)
        path = os.path.join(directory, "result.json")
        start = time.perf_counter()
        if os.path.exists(path):  # finished: read back rather than load and re-evaluate
            with open(path) as f:
                result = json.load(f)
        else:
            result = training.train_and_evaluate(
                run_config(config, task, mode, seed), seed_dir(workdir, seed)
            )
        seconds = time.perf_counter() - start
        records.append(
            {"seed": seed, "task": task, "mode": mode, "result": result, "seconds": seconds}
        )
    return records


# ----------------------------------------------------------------------------- scoring


def merge_combo(config, runs: dict, combo, method: str, model_def, base, seed: int, cache: dict):
    """(merged tree, extra record fields) of one combination with recipe `method`: fixed
    methods take the config's weight; every merge records its seconds and the images it reads
    ("cost"), a recipe that reads images also what it read ("learned"), and learned
    coefficients go to `cache["coefficients"]`."""
    recipe = recipes.get(method)
    combo_runs = [runs[t] for t in combo]
    weights = [config.merge_weight] * len(combo) if recipe.takes_weights else None
    params = report.method_params(config, method)
    merged, record = recipes.merge_runs(
        combo_runs, model_def, base, method, weights, params, seed, cache
    )
    cost = {"cost": {"seconds": record["seconds"], "reads": recipe.reads}}
    if recipe.reads == "none":
        return merged, cost
    own = record["learned"]
    if "coefficients" in own:
        cache.setdefault("coefficients", []).append(
            {"seed": seed, "method": method, "tasks": list(combo), **own}
        )
    keep = ("images_per_task", "labeled_per_task", "split", "objective")
    return merged, {
        **cost,
        "learned": {"seconds": record["seconds"], **{k: own[k] for k in keep if k in own}},
    }


def evaluate_seed(config, workdir: str, seed: int, scorers: dict) -> dict[str, list[dict]]:
    """Adapter-removed scores, similarities and merge scores of one seed, cached in JSONL files.

    `scorers` ({task: scoring.Scorer}) is filled on first use and shared across seeds, so each
    task's eval step compiles once per study.
    """
    runs = {
        t: runs_lib.load(training.run_dir(seed_dir(workdir, seed), "lora", t)) for t in config.tasks
    }
    model_def, base = runs_lib.base_of(list(runs.values()))
    for name, run in runs.items():
        if name not in scorers:
            scorers[name] = scoring.run_scorer(run, model_def)
    out = {}

    path = os.path.join(workdir, "no_adapter.jsonl")
    done = {cache_key(r) for r in read_jsonl(path)}
    for name, run in runs.items():
        record = {"seed": seed, "tasks": [name]}
        if cache_key(record) not in done:
            logs.append_jsonl(path, {**record, "scores": {name: scorers[name](base, run.head)}})

    path = os.path.join(workdir, "similarity.jsonl")
    done = {cache_key(r) for r in read_jsonl(path)}
    for pair in itertools.combinations(config.tasks, 2):
        record = {"seed": seed, "tasks": list(pair)}
        if cache_key(record) not in done:
            adapters = [runs[t].adapter for t in pair]
            values = {m: fn(*adapters) for m, fn in similarity.MEASURES.items()}
            logs.append_jsonl(path, {**record, "similarity": values})

    path = os.path.join(workdir, "merges.jsonl")
    done = {cache_key(r) for r in read_jsonl(path)}
    jobs = [
        (method, combo)
        for method in config.methods
        for combo in combinations(config.tasks, method_sizes(config, method))
        if cache_key({"seed": seed, "method": method, "tasks": combo}) not in done
    ]
    cache: dict = {}
    coefficients_path = os.path.join(workdir, "learned_coefficients.jsonl")
    for method, combo in logs.progress(jobs, desc=f"merges seed {seed}", unit="merge"):
        merged, extra = merge_combo(config, runs, combo, method, model_def, base, seed, cache)
        backbone = lora.fold_into_base(base, merged)
        scores = {t: scorers[t](backbone, runs[t].head) for t in combo}
        record = {"seed": seed, "method": method, "tasks": list(combo), "scores": scores}
        logs.append_jsonl(path, {**record, **extra})
        for learned_record in cache.pop("coefficients", []):
            logs.append_jsonl(coefficients_path, learned_record)
        refit_sizes = config.get("refit_sizes", tuple(config.merge_sizes))
        if method in config.get("refit_methods", ()) and len(combo) in refit_sizes:
            # Reported on rows of its own ("<method>+refit"): it retrains, with labels.
            start = time.perf_counter()
            for t in combo:
                if ("examples", t) not in cache:
                    cache["examples", t] = runs_lib.examples(
                        runs[t], model_def, config.get("refit_examples", 0)
                    )
            refit = {
                t: learned.refit_head(
                    runs[t],
                    model_def,
                    backbone,
                    steps=config.refit_steps,
                    examples=cache["examples", t],
                )
                for t in combo
            }
            seconds = time.perf_counter() - start
            scores = {t: scorers[t](backbone, refit[t]) for t in combo}
            extra = {"refit": {"steps": config.refit_steps, "seconds": seconds}}
            logs.append_jsonl(
                path, {**record, "method": f"{method}+refit", "scores": scores, **extra}
            )
    fuse_seed(config, runs, model_def, base, seed, scorers, path)
    for name in ("no_adapter", "similarity", "merges"):
        records = read_jsonl(os.path.join(workdir, f"{name}.jsonl"))
        out[name] = [r for r in records if r["seed"] == seed]
    return out


def fuse_seed(config, runs: dict, model_def, base, seed: int, scorers: dict, path: str) -> None:
    """The fusion rows (`fused_<gating>`, `jaxmerge.fuse`, the path of `merge --fuse`): every
    combination of `config.fusion_sizes` fused with each gating of `config.fusion`, scored with
    its own heads on the fused backbone, appended to the merges cache beside the merges.

    Each row's cost holds the fit's seconds (a router's include the static fit it starts
    from) and the eval milliseconds per image of the fused
    model and of the same tasks' `cat` merge folded into the base (each the second of two
    timed passes over the task's eval split, so compilation is not counted)."""
    done = {cache_key(r) for r in read_jsonl(path)}
    jobs = [
        (gating, combo)
        for gating in config.get("fusion", {})
        for combo in combinations(config.tasks, config.get("fusion_sizes", config.merge_sizes))
        if cache_key({"seed": seed, "method": f"fused_{gating}", "tasks": combo}) not in done
    ]
    cache: dict = {}
    for gating, combo in logs.progress(jobs, desc=f"fusion seed {seed}", unit="fusion"):
        combo_runs = [runs[t] for t in combo]
        settings = fuse.check(gating, dict(config.fusion[gating]))
        gates, record = fuse.fuse_runs(combo_runs, model_def, base, gating, settings, seed, cache)
        tree = fusion.fused_tree(fuse.stack_runs(combo_runs), gates, gating)
        merged = lora.fold_into_base(base, merging.merge([r.adapter for r in combo_runs], "cat"))
        scores, seconds, examples = {}, {"fused": 0.0, "merged": 0.0}, 0
        for t in combo:
            for kind, args in (
                ("fused", (base, runs[t].head, tree)),
                ("merged", (merged, runs[t].head)),
            ):
                result = scorers[t](*args)  # compiles on first use
                start = time.perf_counter()
                scorers[t](*args)
                seconds[kind] += time.perf_counter() - start
                if kind == "fused":
                    scores[t], examples = result, examples + result["examples"]
        cost = {"seconds": record["fit_seconds"], "reads": "unlabeled"}
        cost |= {f"{k}_ms_per_image": round(1e3 * v / examples, 4) for k, v in seconds.items()}
        keep = ("settings", "objective", "fit_seconds", "images_per_task", "split")
        row = {"seed": seed, "method": f"fused_{gating}", "tasks": list(combo), "scores": scores}
        logs.append_jsonl(path, {**row, "cost": cost, "fusion": {k: record[k] for k in keep}})


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the whole study and writes the report; returns the report's paths."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    training = train_all(config, workdir)
    scorers: dict = {}
    stages: dict[str, list[dict]] = {"no_adapter": [], "similarity": [], "merges": []}
    for seed in config.seeds:
        for name, records in evaluate_seed(config, workdir, seed, scorers).items():
            stages[name] += records
    seconds = time.perf_counter() - start
    # Every finished invocation's time, so that a rerun that only reads the caches still reports
    # what the study cost.
    logs.append_jsonl(os.path.join(workdir, "invocations.jsonl"), {"seconds": seconds})
    total = sum(r["seconds"] for r in read_jsonl(os.path.join(workdir, "invocations.jsonl")))
    return report.write(config, workdir, training, stages, seconds, total)


def define_flags():
    cli_lib.define_config("A study config, e.g. experiments/configs/offline.py:seeds=1.")
    flags.DEFINE_string("workdir", None, "Where the runs, caches and the report go.")


def main(argv):
    del argv
    paths = run_study(flags.FLAGS.config, flags.FLAGS.workdir)
    if not logs.is_writer():  # process 0 wrote and prints the report
        return
    with open(paths["main_table"]) as f:
        print(f.read())
    print("report:")
    for name, path in paths.items():
        print(f"  {name}: {path}")


def cli():
    cli_lib.run(main, define_flags, required=["config", "workdir"], distributed=True)


if __name__ == "__main__":
    cli()
