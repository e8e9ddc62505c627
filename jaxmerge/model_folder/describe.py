"""model.json's content: the model, each task, the preprocessing and the merge recipe; and
what it gives back to score a folder (`task_of`, `data_settings`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jaxmerge
from jaxmerge import checkpoint, config_lib, heads, image_input, models, run_config, tasks
from jaxmerge.input_pipeline import ops

FORMAT = "jaxmerge.multitask_model/1"


def label_names(task, data_dir: str) -> list[str] | None:
    """The class names of a labelled task's (`HeadKind.labelled`) TFDS ClassLabel feature, or
    None."""
    if not task.head_kind.labelled or not task.dataset:  # e.g. a PEFT folder's task
        return None
    try:
        import tensorflow_datasets as tfds

        import jaxmerge.datasets  # noqa: F401  (registers jaxmerge's builders)

        feature = tfds.builder(task.dataset, data_dir=data_dir).info.features[task.target]
    except Exception:  # names are a nicety: any dataset problem (not prepared...) gives indices
        return None
    names = list(getattr(feature, "names", None) or [])
    return names if len(names) == task.outputs else None


def task_info(run) -> dict[str, Any]:
    """A run's task as model.json records it (what `outputs_to_predictions` needs)."""
    task = run.task
    if task.preprocess is not None:
        raise ValueError(
            f"task {task.name!r} has its own preprocessing ({task.preprocess.__name__}); "
            f"allowed: tasks with the default one (a model folder records only that)"
        )
    return {
        "kind": task.kind,
        "outputs": task.outputs,
        "hidden": heads.to_record(run.head_def)["hidden"],
        "head": heads.to_record(run.head_def),
        "labels": label_names(task, run.parts.data.data_dir),
        "input": image_input.dataset_input(task.dataset, run.parts.data.data_dir),
        "metric": task.head_kind.main_metric,
        "higher_is_better": task.head_kind.higher_is_better,
        "target": task.target,
        "spec": json.loads(json.dumps(dict(task.spec))),  # tuples as lists
        "dataset": task.dataset,
        "about": task.about,
        "definition": tasks.registry.to_record(task),  # its splits, for `task_of`
    }


def task_of(info: Mapping[str, Any], name: str) -> tasks.Task:
    """Task `name` of model.json's content: the registered task of that name, else the
    definition the folder records (`tasks.registry.of_run`, as a run folder's task)."""
    return tasks.registry.of_run(name, info["tasks"][name].get("definition"))


def data_settings(info: Mapping[str, Any], data_dir: str = "") -> run_config.DataSettings:
    """The `run_config.DataSettings` that read and prepare a folder's tasks' data as its runs
    did: their data folder `data_dir` ("" = the TFDS default), the normalisation model.json
    records, and the default batch size and threads."""
    config = config_lib.base_config()
    config.data_dir = data_dir
    preprocessing = info["preprocessing"]
    config.model.pixel_mean = tuple(preprocessing.get("mean", [0.5]))
    config.model.pixel_std = tuple(preprocessing.get("std", [0.5]))
    return run_config.data_settings(config)


def preprocessing_info(model_def, settings: run_config.DataSettings) -> dict[str, Any]:
    """model.json's "preprocessing" (`image_input.describe`): a file's steps, then
    `input_pipeline.image_steps` at evaluation with the run's normalisation."""
    return image_input.describe(model_def.image_size, model_def.channels, settings.normalization)


def preprocess_fn(preprocessing: Mapping[str, Any]) -> ops.Preprocess:
    """`(example, rng) -> example` on a stored {"image": uint8 (H, W, C)}: the ops of
    evaluation (`image_input.model_steps`)."""
    return image_input.model_steps(preprocessing)


def check_one_normalization(runs) -> None:
    """A model folder prepares images once for every head: its runs must have trained on
    images normalised alike (`run_config.DataSettings.normalization`)."""
    normalizations = {run.directory: run.parts.data.normalization for run in runs}
    if len({json.dumps(n) for n in normalizations.values()}) > 1:
        listing = "; ".join(f"{d}: {n}" for d, n in normalizations.items())
        raise ValueError(
            f"--run: runs trained on differently normalised images cannot share one model "
            f"folder's preprocessing: {listing}"
        )


def describe(runs, model_def, recipe: Mapping[str, Any], fold: bool) -> dict[str, Any]:
    """model.json's content for runs merged by `recipe` (method, weights, params, learned)."""
    parts = runs[0].parts
    check_one_normalization(runs)
    family = parts.model.family
    keys = models.get(family).architecture_keys
    sources = [
        {
            "task": run.task.name,
            "path": os.path.abspath(run.directory),
            "adapter_sha256": checkpoint.checksum(run.adapter),
            "head_sha256": checkpoint.checksum(run.head),
        }
        for run in runs
    ]
    return {
        "format": FORMAT,
        "jaxmerge_version": jaxmerge.__version__,
        "model": {
            "family": family,
            "kwargs": {k: getattr(model_def, k) for k in keys},
            "dtype": parts.model.dtype,
        },
        "tasks": {run.task.name: task_info(run) for run in runs},
        "preprocessing": preprocessing_info(model_def, parts.data),
        "base": {"source": parts.base.source, "path": parts.base.path},
        "base_fingerprint": runs[0].base_fingerprint,
        "folded": bool(fold),
        "merge": {**recipe, "runs": sources},
    }
