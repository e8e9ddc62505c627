"""Evaluate trained runs: one adapter, several side by side, or several merged into one backbone.

    python -m jaxmerge evaluate --run W/adapters/digits --run W/adapters/textures \
        --merge ties --weights 0.5,0.5 --merge_param density=0.5 --output merged.json
    python -m jaxmerge evaluate --run W/adapters/digits --run W/adapters/textures \
        --merge learned_output_match --output learned.json

Each task is scored with its own head (heads are never merged). With `--merge`, the adapters
are merged with a recipe of `jaxmerge.recipes` (a fixed method, or one that reads images of
each task's training split, as learned merges do), and folded into the
base once, so every task runs on the same backbone; each task's result then holds its single
adapter's score beside it, and the output's "merge" entry the method, its settings and (learned)
the coefficients, seconds and images used; `--no_adapter` scores each head on the bare base
(how much of a task lives in its adapter).

    python -m jaxmerge evaluate --model models/digits_box

`--model` scores every task of a model folder (`python -m jaxmerge merge`, merged or fused)
with its head on the folder's backbone, on the task's eval split read from `--data_dir` (the
TFDS default when not given), each beside its source run's own score where that run's
result.json is still there.
"""

from __future__ import annotations

import json

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import evaluation, logs


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
    return evaluation.evaluate_model(args.model, args.split, args.data_dir)


def _evaluate_run_flags(args):
    weights = [float(w) for w in args.weights] if args.weights else None
    return evaluation.evaluate_runs(
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
