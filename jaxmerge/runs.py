"""Run folders (`WORKDIR/<mode>/<task>`): load one, check that runs share a base, and read the
examples of its task that merges and refits adapt on.

    run = runs.load("W/adapters/digits")
    model_def, base = runs.base_of([run])
    images, labels = runs.examples(run, model_def, count=256, seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxmerge import checkpoint, heads, input_pipeline, run_config, tasks
from jaxmerge.models import load as load_models

Tree = Any


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished training run loaded for inference: its config, head and adapter (if any)."""

    directory: str
    config: ml_collections.ConfigDict
    task: tasks.Task
    head_def: Any  # `heads.MlpHead` or `zero_shot.ZeroShotHead` (`heads.from_record`)
    head: Tree
    adapter: Tree | None
    base_fingerprint: str
    trained_base: Tree | None = None  # a full-finetuning run's own backbone
    # The architecture the run trained (metadata "model": width, depth, layer_norm_eps, ...);
    # None where it is not recorded (PEFT adapters: their base folder fixes it).
    architecture: dict | None = None

    @functools.cached_property
    def parts(self) -> run_config.RunParts:
        """The saved config resolved into its parts (`run_config.of_saved`), read once: the
        model and base `base_of` loads, the data settings its examples and scores read."""
        return run_config.of_saved(self.config, self.task)


RUN_SEARCH_DEPTH = 3  # WORKDIR/<mode>/<task>, and one level above (a study's seed folders)


def runs_under(folder: str, depth: int = RUN_SEARCH_DEPTH) -> list[str]:
    """The run folders (those holding checkpoints/) under `folder`, at most `depth` levels
    down, as paths relative to it, sorted."""
    found = []
    for root, dirs, _ in os.walk(folder):
        level = os.path.relpath(root, folder).count(os.sep) + (root != folder)
        if "checkpoints" in dirs and root != folder:
            found.append(os.path.relpath(root, folder))
            dirs.clear()  # a run folder's own subfolders hold no runs
        elif level >= depth:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def check_run_folder(directory: str, flag: str = "--run") -> None:
    """ValueError naming `flag` unless `directory` is a run folder: it does not exist, is a
    file, or holds no checkpoints/ (then the runs under it are listed, e.g. for a workdir)."""
    if not os.path.exists(directory):
        raise ValueError(f"{flag}: {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise ValueError(f"{flag}: {directory!r} is a file, not a run folder")
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        return
    inside = runs_under(directory)
    shown = ", ".join(inside[:10]) + (f" and {len(inside) - 10} more" if len(inside) > 10 else "")
    listing = f"the runs under it: {shown}" if inside else "no run folder is under it"
    raise ValueError(
        f"{flag}: {directory!r} is not a run folder (it holds no checkpoints/); {listing}; "
        f"allowed: a run folder WORKDIR/<mode>/<task>, e.g. WORKDIR/adapters/digits"
    )


def load(directory: str) -> Run:
    """Loads the latest verified checkpoint of a run folder (`workdir/<mode>/<task>`)."""
    check_run_folder(directory)
    params, metadata = checkpoint.load(os.path.join(directory, "checkpoints"))
    config = ml_collections.ConfigDict(metadata["config"])
    task = tasks.registry.of_run(metadata["task"], metadata.get("task_definition"))
    head_def = heads.from_record(metadata["head"])  # an MLP head for runs without a "type"
    return Run(
        directory,
        config,
        task,
        head_def,
        params["head"],
        params.get("lora"),
        metadata["base_fingerprint"],
        params.get("base"),
        metadata.get("model"),
    )


def model_definition(run: Run) -> dict[str, Any] | None:
    """What fixes the function a run's backbone computes: its family, architecture and compute
    dtype (not dropout or how LoRA and kernels are computed, which leave it unchanged); None
    where the run does not record its architecture."""
    architecture = getattr(run, "architecture", None)
    if architecture is None:
        return None
    model = run.parts.model
    return {"family": model.family, **architecture, "dtype": model.dtype}


def check_one_model(runs: Sequence[Run]) -> None:
    """Refuses runs that define different models: one model computes every run, and on a random
    base `gelu_approximate` or `layer_norm_eps` change it without changing the parameters (and
    so the fingerprint)."""
    defined = [(run, model_definition(run)) for run in runs]
    defined = [(run, definition) for run, definition in defined if definition is not None]
    if not defined:
        return
    first_run, first = defined[0]
    for run, definition in defined[1:]:
        for field in sorted(first.keys() | definition.keys()):
            if first.get(field) != definition.get(field):
                raise ValueError(
                    f"--run: runs define different models and cannot be merged or scored on one: "
                    f"model.{field} is {first.get(field, '<absent>')!r} in {first_run.directory} "
                    f"but {definition.get(field, '<absent>')!r} in {run.directory}"
                )


def base_of(runs: Sequence[Run]):
    """(model, base) the runs were trained on; all runs must share one base and one model
    definition (`check_one_model`)."""
    check_one_model(runs)
    prints = {run.base_fingerprint for run in runs}
    if len(prints) != 1:
        listing = ", ".join(f"{r.directory} ({r.base_fingerprint})" for r in runs)
        raise ValueError(f"runs were trained on different bases and cannot be merged: {listing}")
    parts = runs[0].parts
    model_def, base, _ = load_models.load_base(parts.model, parts.base)
    if checkpoint.fingerprint(base) != runs[0].base_fingerprint:
        raise checkpoint.CheckpointError(
            f"the base named in {runs[0].directory}'s config ({parts.base.source}: "
            f"{parts.base.path!r}) no longer has fingerprint {runs[0].base_fingerprint}"
        )
    return model_def, base


def examples(run: Run, model_def, count: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) float32, targets (N, ...)) of the run's *training* split, never the
    split that is scored, preprocessed as for evaluation (no augmentation).

    Every example when `count` is 0 or at least the split's size, else a seeded sample of
    `count` of them; either way in file order. Independent of any backbone, so a caller that
    adapts many merges on one task reads and preprocesses them once. Held in memory as
    float32: 0.6 MB an image at 224 px.
    """
    task = run.task
    source = input_pipeline.open_split(task, task.train_split, run.parts.data)
    index = np.arange(len(source))
    if 0 < count < len(source):
        index = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    normalization = run.parts.data.normalization
    preprocess = input_pipeline.preprocess(task, model_def.image_size, train=False, **normalization)
    rows = [preprocess(source[int(i)], np.random.default_rng(0)) for i in index]
    images = np.stack([r["image"] for r in rows]).astype(np.float32)
    return images, np.stack([np.asarray(r[task.target]) for r in rows])
