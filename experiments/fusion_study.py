r"""Fusion rows for the offline suite: fused models of pairs, triples and all six adapters.

    python -m experiments.fusion_study --workdir ./workdir --seeds 0,1,2 --sizes 2,3,6

`--workdir` holds the suite's trained adapters (`experiments.study`'s layout,
WORKDIR/seed_S/adapters/<task>). For each combination of tasks the adapters are stacked and
fused (`jaxmerge.fusion`): static gates per layer and adapter, then a per-image router started
from them, both fitted label-free by output matching on 256 training images per task (the
images `learned_output_match` reads). Every task is scored with its own head on the fused
backbone and normalised by its single adapter (1.0 = the adapter alone; errors inverted, as in
the study's report). Records go to WORKDIR/fusion.jsonl (a rerun skips what is done); the end
prints the mean normalised score per size and gating, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import numpy as np

from experiments import study
from experiments.configs import offline
from experiments.report import scores as report_scores
from jaxmerge import adapter_stack, fusion, learned, lora, scoring, train
from jaxmerge import runs as runs_lib

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--workdir", required=True)
ARGS.add_argument("--seeds", default="0,1,2")
ARGS.add_argument("--sizes", default="2,3,6")
ARGS.add_argument("--steps", type=int, default=300)
ARGS.add_argument("--learning_rate", type=float, default=0.05)
ARGS.add_argument("--images", type=int, default=256)
ARGS.add_argument("--gatings", default="static,router")


def run_seed(args, config, seed: int, out_path: str, done: set) -> None:
    seed_dir = study.seed_dir(args.workdir, seed)
    runs = {t: runs_lib.load(train.run_dir(seed_dir, "lora", t)) for t in config.tasks}
    model, base = runs_lib.base_of(list(runs.values()))
    scorers = {t: scoring.run_scorer(r, model) for t, r in runs.items()}
    metric = {t: report_scores.main_metric(t)[0] for t in config.tasks}
    single = {t: scorers[t](lora.fold_into_base(base, r.adapter), r.head) for t, r in runs.items()}
    heads = {
        t: learned.Head(r.head_def, r.head, r.task.kind, r.task.loss_spec) for t, r in runs.items()
    }
    inputs, targets = {}, {}
    for t, run in runs.items():
        inputs[t] = runs_lib.examples(run, model, args.images, seed)[0]
        targets[t] = learned.single_outputs(model, base, run.adapter, heads[t], inputs[t])
    gatings = args.gatings.split(",")
    sizes = [int(k) for k in args.sizes.split(",")]
    for combo in [c for k in sizes for c in itertools.combinations(config.tasks, k)]:
        if all((seed, g, combo) in done for g in gatings):
            continue
        stacked = adapter_stack.stack([runs[t].adapter for t in combo])
        settings = dict(
            steps=args.steps, learning_rate=args.learning_rate, key=jax.random.key(seed)
        )
        fit_args = ([heads[t] for t in combo], [inputs[t] for t in combo])
        init: float | dict = 1.0
        for gating in gatings:
            start = time.perf_counter()
            gates, history = fusion.learn_gates(
                model,
                base,
                stacked,
                *fit_args,
                gating=gating,
                init=init,
                targets=[targets[t] for t in combo],
                **settings,
            )
            seconds = time.perf_counter() - start
            if gating == "static":
                init = gates  # the router starts where the static fusion ended
            tree = fusion.fused_tree(stacked, gates, gating)
            result = {t: scorers[t](base, runs[t].head, tree) for t in combo}
            normalised = {
                t: report_scores.normalised(result[t][metric[t]], single[t][metric[t]], t)
                for t in combo
            }
            record = {
                "seed": seed,
                "gating": gating,
                "tasks": list(combo),
                "scores": result,
                "single": {t: single[t] for t in combo},
                "normalised": normalised,
                "objective": [float(history[0]), float(history[-1])],
                "seconds": seconds,
            }
            if (seed, gating, combo) in done:
                continue
            with open(out_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"seed {seed} {gating:>6} {'+'.join(combo)}: "
                f"{np.mean(list(normalised.values())):.3f} ({seconds:.0f} s)",
                flush=True,
            )


def summary(out_path: str) -> str:
    records = study.read_jsonl(out_path)
    lines = [
        "| gating | size | normalised (mean ± std over seeds) | seeds | merges |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(r["gating"], len(r["tasks"])) for r in records})
    for gating, size in keys:
        chosen = [r for r in records if r["gating"] == gating and len(r["tasks"]) == size]
        seeds = sorted({r["seed"] for r in chosen})
        per_seed = [
            np.mean([np.mean(list(r["normalised"].values())) for r in chosen if r["seed"] == s])
            for s in seeds
        ]
        lines.append(
            f"| {gating} | {size} | {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f} | "
            f"{len(seeds)} | {len(chosen) // max(len(seeds), 1)} |"
        )
    return "\n".join(lines)


def main():
    args = ARGS.parse_args()
    config = offline.get_config(f"seeds={max(int(s) for s in args.seeds.split(',')) + 1}")
    out_path = os.path.join(args.workdir, "fusion.jsonl")
    done = {(r["seed"], r["gating"], tuple(r["tasks"])) for r in study.read_jsonl(out_path)}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_seed(args, config, seed, out_path, done)
    print(summary(out_path))


if __name__ == "__main__":
    main()
