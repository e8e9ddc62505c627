"""Orbax checkpoints of one trained adapter (or base), with our own integrity checks.

Layout: one CheckpointManager per adapter, `workdir/adapters/<task>/<step>/` holding three items:
`params` ({"lora": adapter, "head": head}, or {"base": ...} for a pretrained base),
`opt_state`, and `metadata` (JSON: task, LoRA config, base fingerprint, jaxmerge version,
step, and SHA-256 checksums of the arrays). Orbax restores a checkpoint with a flipped byte
silently with wrong values; the checksum turns that into an error naming the path.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import jaxmerge

Tree = Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: corrupted, or trained on another base."""


def checksum(tree: Tree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in a fixed (sorted-path) order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fingerprint(base: Tree) -> str:
    """A short identity of a base parameter tree (the first 16 hex digits of its checksum)."""
    return checksum(base)[:16]


def manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for one adapter's run; keeps the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    # Naming each item's handler lets `item_metadata` read the saved shapes before a restore.
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


def save(mngr: ocp.CheckpointManager, step: int, params: Tree, opt_state: Tree, metadata: dict):
    """Saves one step (blocking), with `checksum` of params and opt_state in the metadata."""
    metadata = {
        **metadata,
        "step": int(step),
        "jaxmerge_version": jaxmerge.__version__,
        "checksum_params": checksum(params),
        "checksum_opt_state": checksum(opt_state),
    }
    mngr.save(
        int(step),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            metadata=ocp.args.JsonSave(metadata),
        ),
    )
    mngr.wait_until_finished()


def _verify(path: str, metadata: dict, items: dict[str, Tree], expected_base: str | None):
    if any(checksum(tree) != metadata.get(f"checksum_{name}") for name, tree in items.items()):
        raise CheckpointError(
            f"checkpoint {path}: the arrays do not match the checksum saved with them (the files "
            f"are corrupted); delete this step's folder to resume from an earlier step"
        )
    if expected_base is not None and metadata.get("base_fingerprint") not in (None, expected_base):
        raise CheckpointError(
            f"checkpoint {path}: trained on base {metadata['base_fingerprint']}, but the base "
            f"given has fingerprint {expected_base}; load the base it was trained on"
        )


def restore(
    mngr: ocp.CheckpointManager,
    params_like: Tree,
    opt_state_like: Tree,
    step: int | None = None,
    expected_base: str | None = None,
) -> tuple[Tree, Tree, dict]:
    """Restores (params, opt_state, metadata) of `step` (default: the latest), verified.

    `*_like` give the structure, dtypes and shardings to restore into.

    Raises:
      CheckpointError: the checksum does not match, or the base fingerprint differs.
    """
    step = mngr.latest_step() if step is None else step
    path = os.path.join(str(mngr.directory), str(step))
    as_abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(as_abstract(params_like)),
                opt_state=ocp.args.StandardRestore(as_abstract(opt_state_like)),
                metadata=ocp.args.JsonRestore(),
            ),
        )
    except Exception as error:  # Orbax raises many kinds; the user needs the path.
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    params, opt_state, metadata = restored.params, restored.opt_state, restored.metadata
    _verify(path, metadata, {"params": params, "opt_state": opt_state}, expected_base)
    return params, opt_state, metadata


def load(directory: str, step: int | None = None, expected_base: str | None = None):
    """Loads (params, metadata) of a run folder for inference or merging, verified.

    Only `params` is read; its checksum is checked on its own.
    """
    mngr = manager(directory)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"checkpoint folder {os.path.abspath(directory)} holds no checkpoint")
    path = os.path.join(str(mngr.directory), str(step))
    try:
        # Restored onto this process's first device whatever the saving topology: Orbax would
        # otherwise recreate the saved sharding (e.g. 8 devices) and refuse on any other count.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = mngr.item_metadata(step)["params"]
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
        )
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target),
                metadata=ocp.args.JsonRestore(),
            ),
        )
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    _verify(path, restored.metadata, {"params": restored.params}, expected_base)
    # As host numpy arrays, so that callers place them on their own mesh.
    return jax.tree.map(np.asarray, restored.params), restored.metadata
