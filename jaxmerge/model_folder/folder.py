"""Writing and loading a model folder: model.json and its checkpoint, checksummed (see the
package docstring for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmerge import checkpoint, lora
from jaxmerge import runs as runs_lib
from jaxmerge.model_folder import checks, fused, staging
from jaxmerge.model_folder.describe import FORMAT, describe
from jaxmerge.model_folder.model import MultiTaskModel, assemble

Tree = Any
MODEL_FILE, CHECKPOINTS = "model.json", "checkpoints"
# checkpoint.save keeps an optimizer state and Orbax refuses an empty tree; a model has none.
_NO_OPT_STATE = {"none": np.zeros((), np.int8)}


def check_output_folder(folder: str, flag: str = "--output") -> None:
    """Refuses, in one line naming `flag`, a path where a new folder cannot go: a file, a
    non-empty folder (a model is never overwritten), a mount point, a parent this user cannot
    write (`staging.check_target`)."""
    staging.check_target(folder, flag)


def write(directory: str, info: Mapping[str, Any], base: Tree, merged: Tree, head_params):
    """Writes a model folder's content into the existing empty `directory` (a partial folder
    of `staging.stage`). With `info["folded"]`, the checkpoint holds
    `lora.fold_into_base(base, merged)` as "base" and no "merged"."""
    params = {"heads": dict(head_params)}
    if info["folded"]:
        params["base"] = lora.fold_into_base(base, merged)
    else:
        params.update(base=base, merged=merged)
    write_arrays(directory, info, params)


def write_fused(directory: str, info, base: Tree, adapters, gates, head_params) -> None:
    """Writes a fused model folder's content (`fused`: model.json from `fused.describe_fused`,
    each task's adapter, the gates {target path: gate} and the heads) into the existing empty
    `directory`; gates that do not fit the adapters are refused before anything is written."""
    write_arrays(directory, info, fused.arrays(info, base, adapters, gates, head_params))


def write_arrays(directory: str, info: Mapping[str, Any], params: Tree) -> None:
    """model.json, then the checkpoint of `params` with model.json's SHA-256 in its metadata."""
    text = json.dumps(info, indent=2) + "\n"
    with open(os.path.join(directory, MODEL_FILE), "w") as f:
        f.write(text)
    metadata = {"format": info.get("format", FORMAT), "model_json_sha256": _sha256(text.encode())}
    # alone: a multi-host merge writes its model folder from process 0 only.
    mngr = checkpoint.manager(os.path.join(directory, CHECKPOINTS), max_to_keep=1, alone=True)
    checkpoint.save(mngr, 0, params, _NO_OPT_STATE, metadata)
    mngr.close()


def save(folder: str, info: Mapping[str, Any], base: Tree, merged: Tree, head_params) -> str:
    """Writes a model folder (see the package docstring); returns its absolute path. Written
    to a hidden sibling folder, then renamed (`staging.stage`): a crash leaves no half-written
    model, and a folder that cannot be written is refused before anything is."""
    with staging.stage([("--output", folder)]) as partials:
        write(partials["--output"], info, base, merged, head_params)
    return staging.resolve(folder)


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def load(folder: str) -> MultiTaskModel:
    """Reads a model folder, merged or fused (`fused`), verified (array, metadata and
    model.json checksums).

    Raises:
      ValueError: not a model folder. checkpoint.CheckpointError: a corrupted checkpoint or a
        model.json that does not match the checksum saved with the checkpoint.
    """
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"--model: {folder!r} is not a model folder (no {MODEL_FILE}); allowed: a folder "
            f"written by `python -m jaxmerge merge` or a run folder WORKDIR/adapters/<task>"
        )
    params, metadata = checkpoint.load(os.path.join(folder, CHECKPOINTS), step=0)
    with open(path, "rb") as f:
        content = f.read()
    if metadata.get("model_json_sha256") != _sha256(content):
        raise checkpoint.CheckpointError(
            f"model folder {folder}: {MODEL_FILE} does not match the checksum saved with its "
            f"checkpoint (edited or corrupted); write the model again with `python -m jaxmerge "
            f"merge`"
        )
    info = json.loads(content)
    if info.get("format") == fused.FORMAT:
        return fused.from_arrays(path, info, params)
    if info.get("format") != FORMAT:
        allowed = f"{FORMAT!r} or {fused.FORMAT!r}"
        raise ValueError(f"{path}: format {info.get('format')!r}; allowed: {allowed}")
    model_def, head_defs = checks.check_against_arrays(path, info, params)
    merged = params.get("merged")
    backbone = params["base"] if info["folded"] else lora.fold_into_base(params["base"], merged)
    return assemble(model_def, backbone, params["heads"], info, merged, head_defs)


def from_run(directory: str) -> MultiTaskModel:
    """A single training run (WORKDIR/<mode>/<task>) as a one-task model, its adapter folded."""
    run = runs_lib.load(directory)
    if run.config.mode == "full":
        raise ValueError(
            f"--model: {directory!r} is a full-finetuning run; allowed: a LoRA or head run "
            f"(WORKDIR/adapters/<task>, WORKDIR/heads/<task>) or a model folder"
        )
    model_def, base = runs_lib.base_of([run])
    backbone = base if run.adapter is None else lora.fold_into_base(base, run.adapter)
    recipe = {"method": None, "weights": None, "params": {}, "learned": None}
    info = describe([run], model_def, recipe, fold=True)
    return assemble(model_def, backbone, {run.task.name: run.head}, info, None)
