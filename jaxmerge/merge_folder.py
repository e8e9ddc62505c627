"""Writing a multi-task model folder (`jaxmerge.model_folder`) from trained adapters: merged
(`merge_to_folder`) or fused under fitted gates (`fuse_to_folder`).

The sources are LoRA run folders and PEFT LoRA folders of Hugging Face ViT classifiers
(`load_peft_run`: each a task named after its folder, its head the saved classifier), all on
one base (`load_runs`). A merge is a recipe of `jaxmerge.recipes` (a fixed method, or one that
reads images of each task's training split); the folder holds the base and the merged adapter
(or, folded, the backbone with the adapter folded in), every task's own head and model.json,
and the PEFT and Hugging Face exports are written beside it when asked for. A fusion keeps the
adapters apart and fits gates that mix them at every adapted layer (`jaxmerge.fuse`). Every
request is checked before anything loads (`check_request`), and the folders are written whole
or not at all (`model_folder.staging`). `python -m jaxmerge merge` is the command over it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmerge import (
    checkpoint,
    config_lib,
    fuse,
    heads,
    logs,
    model_folder,
    recipes,
    run_config,
    tasks,
)
from jaxmerge import runs as runs_lib
from jaxmerge.models import load

Tree = Any


def check_request(
    directories: Sequence[str],
    method: str,
    weights: Sequence[float] | None,
    fold: bool,
    output: str,
    export_peft: str | None,
    export_hf: str | None = None,
    params: dict[str, Any] | None = None,
    fuse_gating: str | None = None,
) -> None:
    """Every flag checked before anything loads: ValueError naming the flag otherwise."""
    if not directories:
        raise ValueError(
            "--run / --peft: give at least one run folder (WORKDIR/adapters/<task>) or PEFT "
            "adapter folder"
        )
    # Multi-host: process 0 alone writes, so only it checks the folders (it may have written
    # them before another process gets here).
    writer = logs.is_writer()
    if writer:
        model_folder.check_output_folder(output)
    outputs = [("--output", output), ("--export_peft", export_peft), ("--export_hf", export_hf)]
    model_folder.staging.check_distinct(outputs)
    if fuse_gating is not None:
        _check_fuse_request(fuse_gating, method, weights, fold, export_peft, export_hf, params)
        return
    if method is None:
        raise ValueError(
            f"--method: none given; allowed: one of {sorted(recipes.names())}, or --fuse "
            f"static|router|mixture"
        )
    recipes.check(method, params, weights)
    if export_peft is not None:
        if fold:
            model_folder.check_peft_exportable(None, True, method)
        if writer:
            model_folder.check_output_folder(export_peft, "--export_peft")
    if export_hf is not None and writer:
        model_folder.check_output_folder(export_hf, "--export_hf")


def _check_fuse_request(gating, method, weights, fold, export_peft, export_hf, params) -> None:
    """`--fuse` with its settings (`fuse.check`) and without the flags of a merge."""
    fuse.check(gating, params)
    merge_only = [
        ("--method", method),
        ("--weights", weights),
        ("--fold", fold or None),
        ("--export_peft", export_peft),
        ("--export_hf", export_hf),
    ]
    for flag, value in merge_only:
        if value is not None:
            raise ValueError(
                f"{flag}: got {value!r} with --fuse {gating}; allowed: --fuse alone (a fused "
                f"model keeps its adapters apart: no merge method, weights, fold or export)"
            )


def load_peft_run(folder: str, base: str | None) -> runs_lib.Run:
    """A PEFT LoRA adapter folder of a Hugging Face ViT classifier as a run: its task is named
    after the folder, its head is the adapter's saved classifier (`modules_to_save`) reading
    the class token, and its base is `base` (a Hugging Face ViT folder) or else the folder the
    adapter config's `base_model_name_or_path` names.

    Raises:
      ValueError: naming the folder, when it has no classifier (a task needs its head) or no
        base folder can be found.
    """
    from jaxmerge.interop import peft

    adapter, head, peft_config = peft.load_peft_adapter(folder)
    name = os.path.basename(os.path.normpath(folder))
    if head is None:
        raise ValueError(
            f"--peft: {folder!r} has no classifier (modules_to_save), so its task has no head; "
            f"allowed: a PEFT adapter of a ViTForImageClassification saved with its classifier"
        )
    base = base or peft_config.get("base_model_name_or_path") or ""
    if not os.path.isdir(os.path.expanduser(base)):
        raise ValueError(
            f"--base: {base!r} (for PEFT adapter {folder!r}) is not a folder; allowed: the "
            f"Hugging Face ViT folder the adapter was trained on"
        )
    config = config_lib.base_config()
    config.task = name
    config.base.source, config.base.path = "hf", os.path.abspath(os.path.expanduser(base))
    outputs = int(np.shape(head["out"]["bias"])[0])
    task = tasks.Task(name, "", "classification", outputs, suite="user", about=f"PEFT {folder}")
    parts = run_config.of_saved(config)
    model_def, base_params, _ = load.load_base(parts.model, parts.base)
    return runs_lib.Run(
        os.path.abspath(folder),
        config,
        task,
        heads.MlpHead(0, outputs),
        head,
        adapter,
        checkpoint.fingerprint(base_params),
    )


def load_runs(directories, peft_folders=(), base=None):
    """Loads the runs (and PEFT folders) and checks they can share a model folder: LoRA runs,
    one per task, on one base and model (`runs.base_of`), normalised alike. Returns (runs,
    model_def, base parameters)."""
    runs = [runs_lib.load(d) for d in directories]
    runs += [load_peft_run(folder, base) for folder in peft_folders]
    headless = [r.directory for r in runs if r.adapter is None]
    if headless:
        raise ValueError(
            f"--run: {headless[0]!r} has no adapter (a head or full run); allowed: LoRA runs "
            f"WORKDIR/adapters/<task>"
        )
    names = [run.task.name for run in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--run: task(s) {twice} given twice; allowed: one run per task")
    model_def, base_params = runs_lib.base_of(runs)
    model_folder.check_one_normalization(runs)
    return runs, model_def, base_params


def _merge_runs(
    directories, peft_folders, base, method, weights, params, seed, fold, export_peft, export_hf
):
    """Loads the runs (`load_runs`), checks the exports asked for, and merges: (runs, merged,
    recipe, model_def, base)."""
    runs, model_def, base_params = load_runs(directories, peft_folders, base)
    if export_hf is not None:  # refused before anything is written
        model_folder.check_hf_exportable(model_def, runs[0].parts.model.family)
    merged, recipe = recipes.merge_runs(runs, model_def, base_params, method, weights, params, seed)
    if export_peft is not None:  # refused before anything is written
        model_folder.check_peft_exportable(merged, fold, method)
    return runs, merged, recipe, model_def, base_params


def merge_to_folder(
    directories: Sequence[str],
    method: str | None,
    output: str,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | None = None,
    fold: bool = False,
    export_peft: str | None = None,
    seed: int = 0,
    export_hf: str | None = None,
    peft_folders: Sequence[str] = (),
    base: str | None = None,
    fuse_gating: str | None = None,
) -> dict[str, Any]:
    """Merges the runs' adapters and writes a model folder (and the PEFT and Hugging Face
    exports asked for); returns a summary: the folder, tasks, method, whether folded, the
    exports, seconds. With `fuse_gating` ("static" or "router", `--fuse`), writes a fused
    model folder instead (`fuse_to_folder`). On a multi-host job every process merges and
    process 0 alone checks the folders and writes them."""
    start = time.perf_counter()
    weights = None if weights is None else [float(w) for w in weights]
    sources = [*directories, *peft_folders]
    check_request(
        sources, method, weights, fold, output, export_peft, export_hf, params, fuse_gating
    )
    if fuse_gating is not None:
        return fuse_to_folder(directories, fuse_gating, output, params, seed, peft_folders, base)
    requests = [("--output", output), ("--export_peft", export_peft), ("--export_hf", export_hf)]
    writer = logs.is_writer()  # multi-host: every process merges, process 0 alone writes
    # The partial folders are made now, before any compute: a place that cannot be written
    # fails here, and a failed or killed merge leaves nothing at the targets.
    with model_folder.staging.stage(requests if writer else []) as partials:
        runs, merged, recipe, model_def, base = _merge_runs(
            directories,
            peft_folders,
            base,
            method,
            weights,
            params,
            seed,
            fold,
            export_peft,
            export_hf,
        )
        if writer:
            _write(partials, runs, merged, recipe, model_def, base, fold)
    folder = model_folder.staging.resolve(output)
    exported = None if export_peft is None else model_folder.staging.resolve(export_peft)
    exported_hf = None if export_hf is None else model_folder.staging.resolve(export_hf)
    names = [run.task.name for run in runs]
    return {
        "output": folder,
        "tasks": names,
        "method": method,
        "folded": bool(fold),
        "peft": exported,
        "hf": exported_hf,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _write(partials: dict[str, str], runs, merged, recipe, model_def, base, fold) -> None:
    """Writes the model folder and the exports asked for into their partial folders."""
    info = model_folder.describe(runs, model_def, recipe, fold)
    heads = {run.task.name: run.head for run in runs}
    model_folder.write(partials["--output"], info, base, merged, heads)
    if "--export_peft" in partials or "--export_hf" in partials:
        model = model_folder.load(partials["--output"])
    if "--export_peft" in partials:
        model_folder.write_peft(model, partials["--export_peft"])
    if "--export_hf" in partials:
        model_folder.write_hf(model, partials["--export_hf"])


def fuse_to_folder(
    directories: Sequence[str],
    gating: str,
    output: str,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    peft_folders: Sequence[str] = (),
    base: str | None = None,
) -> dict[str, Any]:
    """Fuses the runs' adapters under gates fitted on each task's training images
    (`fuse.fuse_runs`) and writes a fused model folder; returns a summary: the folder, tasks,
    gating, the objective of each fit, the seconds of the fits and in all."""
    start = time.perf_counter()
    settings = fuse.check(gating, params)
    with model_folder.staging.stage([("--output", output)]) as partials:
        runs, model_def, base_params = load_runs(directories, peft_folders, base)
        fuse.stack_runs(runs)  # refuses dense adapters before the images are read
        gates, record = fuse.fuse_runs(runs, model_def, base_params, gating, settings, seed)
        info = model_folder.fused.describe_fused(runs, model_def, record)
        adapters = {run.task.name: run.adapter for run in runs}
        heads = {run.task.name: run.head for run in runs}
        model_folder.write_fused(partials["--output"], info, base_params, adapters, gates, heads)
    return {
        "output": model_folder.staging.resolve(output),
        "tasks": [run.task.name for run in runs],
        "fuse": gating,
        "objective": record["objective"],
        "fit_seconds": record["fit_seconds"],
        "seconds": round(time.perf_counter() - start, 2),
    }
