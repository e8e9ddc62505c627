"""Orbax checkpoints of one trained adapter (or base), with our own integrity checks.

Layout: one CheckpointManager per adapter, `workdir/adapters/<task>/<step>/` holding three items:
`params` ({"lora": adapter, "head": head}, or {"base": ...} for a pretrained base),
`opt_state`, and `metadata` (JSON: task, LoRA config, base fingerprint, jaxmerge version,
step, and SHA-256 checksums of the arrays and of the metadata itself). Orbax restores a
checkpoint with a flipped byte silently with wrong values; the checksums turn that into an
error naming the path.

Reading falls back: when the latest step is empty, half-written or corrupted (a checksum that
does not match, a truncated or missing file), `restore` and `load` warn and take the newest step
that verifies. Only training's resume (`restore`) moves the bad step aside, to
`<run>/checkpoints_bad/<step>` (never deleted, so a person can inspect it), so that it saves
the step again; `load` (evaluate, merge, predict) leaves it where it is and writes nothing, so
it reads read-only run folders. A step whose arrays have other shapes or another tree than the
model asked for is not corrupted but another model (`ModelMismatch`): never moved, never
skipped. A step asked for by number is never replaced by another. Reads never create folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import jaxmerge
from jaxmerge import lora, stderr_aside

Tree = Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: corrupted, or trained on another base."""


class CheckpointWriteError(CheckpointError):
    """A step that could not be written (a full disk, a lost mount). Orbax's background threads
    may still be failing, so the command line exits at once after saying so (`cli`)."""


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


def manager(
    directory: str, max_to_keep: int = 3, create: bool = True, alone: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager for one adapter's run; keeps the newest `max_to_keep` steps.

    `create=False` for reads: a missing folder is an error, never made empty. `alone`: on a
    multi-host job, this process reads or writes without the others (Orbax otherwise waits for
    every process at each step); a no-op in a single process.
    """
    directory = os.path.abspath(directory)
    if not create and not os.path.isdir(directory):
        raise CheckpointError(
            f"checkpoint folder {directory} does not exist"
            + (" (it is a file)" if os.path.exists(directory) else "")
        )
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    if alone and jax.process_count() > 1:
        me = jax.process_index()
        if create:  # Orbax makes no folder for a process on its own
            os.makedirs(directory, exist_ok=True)
        only_me = ocp.options.MultiprocessingOptions(me, {me}, f"process_{me}_alone")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False, multiprocessing_options=only_me
        )
    # Naming each item's handler lets `item_metadata` read the saved shapes before a restore.
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _metadata_checksum(metadata: dict) -> str:
    """SHA-256 of the metadata's canonical JSON, without the field that holds it."""
    content = {k: v for k, v in metadata.items() if k != "checksum_metadata"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def save(mngr: ocp.CheckpointManager, step: int, params: Tree, opt_state: Tree, metadata: dict):
    """Saves one step (blocking), with `checksum` of params and opt_state in the metadata and a
    checksum of the metadata itself."""
    metadata = {
        **metadata,
        "step": int(step),
        "jaxmerge_version": jaxmerge.__version__,
        "checksum_params": checksum(params),
        "checksum_opt_state": checksum(opt_state),
    }
    metadata["checksum_metadata"] = _metadata_checksum(metadata)
    if jax.process_count() > 1:  # Orbax saves no process-local jax.Array on a multi-host job
        to_host = lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", False) else x
        params, opt_state = jax.tree.map(to_host, (params, opt_state))
    path = os.path.join(str(mngr.directory), str(step))
    failure = None
    with stderr_aside.stderr_aside(watched=True) as aside:
        try:
            mngr.save(
                int(step),
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    metadata=ocp.args.JsonSave(metadata),
                ),
            )
            mngr.wait_until_finished()
        except Exception as error:  # e.g. a full disk: one line, the earlier steps stay
            failure = error
            # Lets Orbax's writer threads finish failing while their output still goes aside.
            with contextlib.suppress(Exception):
                mngr.close()
            time.sleep(0.5)
    if failure is None:
        aside.pass_on()
        return
    details = f"; Orbax's own messages are in {aside.path}" if aside.keep() else ""
    raise CheckpointWriteError(
        f"checkpoint {path} could not be written: {_cause(failure)}{details}"
    ) from None


class _Corrupted(CheckpointError):
    """A step that cannot be read or does not verify (as opposed to a wrong base)."""


class ModelMismatch(CheckpointError):
    """A step that holds another model than the one asked for (a changed lora.rank,
    lora.targets or head): its files are intact, so it is never moved or skipped."""


def _cause(error: BaseException) -> str:
    """One short line for an Orbax / TensorStore error (whose messages can be 60-line spec
    dumps): the kind of failure, then the first line of the message, cut to 160 characters."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    lower = text.lower()
    if "no space left" in lower:
        kind = "disk full"
    elif "data_loss" in lower or "checksum" in lower or "corrupt" in lower:
        kind = "corrupted"
    elif isinstance(error, FileNotFoundError) or "not found" in lower or "no such file" in lower:
        kind = "missing or half-written"
    elif "truncat" in lower or "unexpected end" in lower or "out of range" in lower:
        kind = "truncated"
    else:
        kind = "unreadable"
    return f"{kind} ({first[:160]})"


def _verify(path: str, metadata: dict, items: dict[str, Tree], expected_base: str | None):
    if not isinstance(metadata, dict) or "checksum_params" not in metadata:
        raise _Corrupted(f"checkpoint {path}: its metadata is missing or unreadable")
    stored = metadata.get("checksum_metadata")
    if stored is not None and stored != _metadata_checksum(metadata):
        raise _Corrupted(
            f"checkpoint {path}: the metadata does not match the checksum saved with it (corrupted)"
        )
    if any(checksum(tree) != metadata.get(f"checksum_{name}") for name, tree in items.items()):
        raise _Corrupted(
            f"checkpoint {path}: the arrays do not match the checksum saved with them (the files "
            f"are corrupted)"
        )
    if expected_base is not None and metadata.get("base_fingerprint") not in (None, expected_base):
        raise CheckpointError(
            f"checkpoint {path}: trained on base {metadata['base_fingerprint']}, but the base "
            f"given has fingerprint {expected_base}; load the base it was trained on"
        )


def _read_step(mngr, step: int, args: dict, expected_base: str | None, verify_items):
    path = os.path.join(str(mngr.directory), str(step))
    failure = None
    with stderr_aside.stderr_aside() as aside:  # a failed read also sets Orbax's threads printing
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # Orbax raises many kinds; the user needs the path and cause.
            failure = error
            time.sleep(0.2)
    if failure is not None:
        details = f"; Orbax's own messages are in {aside.path}" if aside.keep() else ""
        raise _Corrupted(f"checkpoint {path} cannot be read: {_cause(failure)}{details}")
    aside.pass_on()
    _verify(path, restored.metadata, {n: restored[n] for n in verify_items}, expected_base)
    return restored


def _move_aside(mngr, step: int) -> str:
    """Moves a bad step folder to `<run>/checkpoints_bad/<step>[-N]`; returns where."""
    source = os.path.join(str(mngr.directory), str(step))
    aside = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints_bad")
    os.makedirs(aside, exist_ok=True)
    dest, n = os.path.join(aside, str(step)), 1
    while os.path.exists(dest):
        dest, n = os.path.join(aside, f"{step}-{n}"), n + 1
    shutil.move(source, dest)
    return dest


def _newest_good(mngr, step, read, move_bad: bool):
    """`read(step)` for the step asked for, or else the newest step that verifies, with a
    warning for each bad one, which `move_bad` moves aside (training) and reads leave."""
    if step is not None:
        return read(step)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"checkpoint folder {mngr.directory} holds no checkpoint")
    causes = []
    for candidate in steps:
        try:
            return read(candidate)
        except _Corrupted as error:
            causes.append(str(error))
            if move_bad:
                dest = _move_aside(mngr, candidate)
                logging.warning("%s; moved it to %s and trying the step before", error, dest)
                mngr.reload()
            else:
                logging.warning("%s; left as it is, reading the step before", error)
    raise CheckpointError(f"no step of {mngr.directory} verifies: {'; '.join(causes)}")


def _shapes(tree: Tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def check_same_model(path: str, saved: Tree, wanted: Tree) -> None:
    """Raises ModelMismatch naming the first array path whose presence or shape differs
    between a step's saved params (`item_metadata`) and the params asked for."""
    old, new = _shapes(saved), _shapes(wanted)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            was = old.get(key, "absent")
            now = new.get(key, "absent")
            raise ModelMismatch(
                f"checkpoint {path} holds another model than this config builds (params{key}: "
                f"saved {was}, now {now}); the config differs from the one it was trained with "
                f"(lora.rank, lora.targets, head...): use that config, or another --workdir"
            )


def read_metadata(mngr: ocp.CheckpointManager, step: int) -> dict | None:
    """A step's metadata JSON if it is readable and matches its own checksum, else None
    (reads no array: for checks before a restore)."""
    path = os.path.join(str(mngr.directory), str(step), "metadata", "metadata")
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("checksum_metadata") != _metadata_checksum(
        metadata
    ):
        return None
    return metadata


def restore(
    mngr: ocp.CheckpointManager,
    params_like: Tree,
    opt_state_like: Tree,
    step: int | None = None,
    expected_base: str | None = None,
) -> tuple[Tree, Tree, dict]:
    """Restores (params, opt_state, metadata) of `step` (default: the newest step that
    verifies), verified.

    `*_like` give the structure, dtypes and shardings to restore into.

    Raises:
      CheckpointError: the step asked for (or every step) is unreadable or does not match its
        checksums, or the base fingerprint differs.
    """
    as_abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    args = dict(
        params=ocp.args.StandardRestore(as_abstract(params_like)),
        opt_state=ocp.args.StandardRestore(as_abstract(opt_state_like)),
        metadata=ocp.args.JsonRestore(),
    )

    def read(s):
        # Orbax fails on a shape or tree that differs as on a broken file: compare first, so
        # another model is named as such and never moved aside as corrupted.
        check_same_model(_step_path(mngr, s), _saved_params(mngr, s), params_like)
        return _read_step(mngr, s, args, expected_base, ("params", "opt_state"))

    restored = _newest_good(mngr, step, read, move_bad=True)
    return restored.params, restored.opt_state, restored.metadata


def _step_path(mngr, step: int) -> str:
    return os.path.join(str(mngr.directory), str(step))


def _saved_params(mngr, step: int) -> Tree:
    """The saved params' tree of array metadata (shapes and dtypes, no values)."""
    path = _step_path(mngr, step)
    try:
        saved = mngr.item_metadata(step)["params"]
    except Exception as error:
        raise _Corrupted(f"checkpoint {path} cannot be read: {_cause(error)}") from None
    if saved is None or not jax.tree.leaves(saved):  # a step whose params never got written
        raise _Corrupted(f"checkpoint {path} cannot be read: missing or half-written (no params)")
    return saved


def load(directory: str, step: int | None = None, expected_base: str | None = None):
    """Loads (params, metadata) of a run folder for inference or merging, verified, as host
    numpy arrays on any device count (default step: the newest that verifies).

    Only `params` is read; its checksum is checked on its own. On a multi-host job each
    process reads alone, so any of them may load whatever the others do.
    """
    mngr = manager(directory, create=False, alone=True)
    # Restored onto this process's first device whatever the saving topology: Orbax would
    # otherwise recreate the saved sharding (e.g. 8 devices) and refuse on any other count.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def read(s):
        try:
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                _saved_params(mngr, s),
            )
        except _Corrupted:
            raise
        except Exception as error:
            raise _Corrupted(
                f"checkpoint {_step_path(mngr, s)} cannot be read: {_cause(error)}"
            ) from None
        args = dict(params=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore())
        return _read_step(mngr, s, args, expected_base, ("params",))

    # A read never moves or writes anything: a bad step is skipped (training moves it).
    restored = _newest_good(mngr, step, read, move_bad=False)
    if "lora" in restored.params:  # checksums pass for an adapter saved with NaN in it
        where = os.path.join(str(mngr.directory), str(restored.metadata["step"]))
        lora.check_finite(restored.params["lora"], f"checkpoint {where} adapter")
    # As host numpy arrays, so that callers place them on their own mesh.
    return jax.tree.map(np.asarray, restored.params), restored.metadata
