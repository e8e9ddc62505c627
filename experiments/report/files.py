"""Writes the report: tables.md, main_table.md, raw.jsonl and the plots."""

from __future__ import annotations

import json
import os
import platform

import jax

from experiments.report import scores
from experiments.report.plots import plots
from experiments.report.scores import Scores, method_params
from experiments.report.tables import tables
from jaxmerge import logs


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def write(
    config, workdir: str, training, stages, seconds: float, total_seconds: float | None = None
) -> dict[str, str]:
    """Writes report/{tables.md, main_table.md, raw.jsonl, *.png}; returns {name: path}.

    On multi-host runs only process 0 writes; the others return {} (nothing was written).
    """
    if not logs.is_writer():
        return {}
    directory = os.path.join(workdir, "report")
    os.makedirs(directory, exist_ok=True)
    s = Scores(config, training, stages)
    made = tables(s)
    train_cfg = config.train
    meta = {
        "suite": config.suite,
        "seeds": list(config.seeds),
        "tasks": list(config.tasks),
        "methods": {m: method_params(config, m) for m in config.methods},
        "merge_weight": config.merge_weight,
        "lora": {"rank": train_cfg.lora.rank, "alpha": train_cfg.lora.alpha,
                 "targets": train_cfg.lora.targets},
        "learning_rate": train_cfg.learning_rate,
        "steps": train_cfg.steps,
        "batch_size": train_cfg.batch_size,
        "base": {"source": train_cfg.base.source, "path": os.path.basename(train_cfg.base.path)},
        "machine": machine(),
        "invocation_seconds": round(seconds, 1),
        "study_seconds": round(total_seconds if total_seconds is not None else seconds, 1),
        "train_seconds": round(sum(r["seconds"] for r in training), 1),
    }  # fmt: skip
    titles = {
        "main": f"Main table: each task's metric, {config.main_method} merges",
        "per_task_pairs": "Each task inside pair merges (mean over its partners), per method",
        "per_task_triples": "Each task inside triple merges (mean over its partners), per method",
        "normalised_by_method": "Normalised score per method (merged / single adapter)",
        "score_and_cost": f"Score beside cost: seconds per merge ({_machine()}) and images read",
        "learned_cost": f"What each learned merge and head refit cost ({_machine()})",
        "fusion_cost": f"Fused models (adapters kept apart, learned gates): score, fit and eval "
        f"cost per image against one merged forward ({_machine()})",
        "normalised_pairs": "Normalised score of each pair merge, per method",
        "normalised_triples": "Normalised score of each triple merge, per method",
        "similarity": "Adapter similarity beside the pair's merge quality",
        "similarity_correlation": "Correlation of similarity and merge quality over pairs",
        "relation": "Merge quality by how alike the two tasks' images are",
    }
    settings = (
        f"Suite `{config.suite}`, seeds {list(config.seeds)}, LoRA rank {train_cfg.lora.rank} "
        f"(alpha {train_cfg.lora.alpha}, targets `{train_cfg.lora.targets}`), learning rate "
        f"{train_cfg.learning_rate}, {train_cfg.steps} steps of batch {train_cfg.batch_size} "
        f"for adapters and heads alike, merge weight {config.merge_weight}, methods "
        + ", ".join(f"`{m}` {method_params(config, m) or ''}".strip() for m in config.methods)
        + f". The study took {meta['study_seconds'] / 60:.1f} min over its finished invocations "
        f"on {meta['machine']['cpu_count']} CPU cores ({meta['machine']['processor']}), this "
        f"invocation {seconds / 60:.1f} min (stages cached in the workdir by earlier "
        "invocations were read back, not rerun; an interrupted invocation's time is not "
        "counted).\n"
    )
    text = "# Study report\n\n" + settings + "\n" + (scores.__doc__.split("\n\n", 1)[1]) + "\n"
    for name, table in made.items():
        text += f"## {titles.get(name, name)}\n\n{table}\n"
    paths = {"tables": os.path.join(directory, "tables.md")}
    with open(paths["tables"], "w") as f:
        f.write(text)
    paths["main_table"] = os.path.join(directory, "main_table.md")
    with open(paths["main_table"], "w") as f:
        f.write(f"{titles['main']}\n\n{made['main']}")
    paths.update(plots(s, directory))

    paths["raw"] = os.path.join(directory, "raw.jsonl")
    with open(paths["raw"], "w") as f:
        f.write(json.dumps({"kind": "meta", **meta}) + "\n")
        for r in training:
            f.write(json.dumps({"kind": "train", **r}) + "\n")
        for name, records in stages.items():
            for r in records:
                f.write(json.dumps({"kind": name, **r}) + "\n")
    return paths


def _machine() -> str:
    """The devices the timings were taken on, e.g. '1 x NVIDIA H100' or '8 cpu devices on 2
    cores'."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{jax.device_count()} cpu devices on {os.cpu_count()} cores"
    return f"{jax.device_count()} x {device.device_kind}"
