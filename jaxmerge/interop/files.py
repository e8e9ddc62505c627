"""The file readers every checkpoint loader shares: JSON, safetensors (single or sharded),
big_vision `.npz`, and the shape check of a loaded tree against the tree a model expects.

Each raises a one-line ValueError naming the file (or the tensor) for anything unreadable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Tree = Any


def read_json(path: str) -> dict:
    """A JSON file as a dict; ValueError for a missing file or invalid JSON, naming the path."""
    if not os.path.isfile(path):
        raise ValueError(f"missing file: {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r} is not valid JSON ({error})") from None


def _safetensors_files(folder: str) -> tuple[list[str], str]:
    """(the safetensors files of a checkpoint folder, the index path): `model.safetensors`,
    or the shards its `model.safetensors.index.json` lists; [] for neither."""
    single, index = (os.path.join(folder, f"model.safetensors{s}") for s in ("", ".index.json"))
    if os.path.isfile(single):
        return [single], index
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [os.path.join(folder, shard) for shard in shards], index
    return [], index


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards its index lists, as numpy arrays."""
    from safetensors.numpy import load_file

    files, index = _safetensors_files(folder)
    if not files:
        raise ValueError(
            f"missing file: {os.path.join(folder, 'model.safetensors')!r} does not exist (nor a "
            f"sharded {os.path.basename(index)}); only safetensors checkpoints are supported, "
            f"convert pytorch_model.bin first"
        )
    state = {}
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"missing file: {file!r} (listed in {index!r}) does not exist")
        state.update(load_file(file))
    return state


def tensor_names(folder: str) -> list[str]:
    """The tensor names of a folder's model.safetensors (from its header) or of its shards'
    index, without reading any tensor; [] without either file."""
    from safetensors import safe_open

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "np") as f:
            return list(f.keys())
    index = single + ".index.json"
    if os.path.isfile(index):
        return list(read_json(index).get("weight_map", {}))
    return []


def read_npz(path: str, keep: Callable[[str], bool] = lambda key: True) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` whose key `keep` accepts; ValueError for a missing file."""
    if not os.path.isfile(path):
        raise ValueError(f"missing file: {path!r} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if keep(key)}


def _flat_shapes(tree: Tree) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v))
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_shapes(
    expected: Tree, params: Tree, source: str, names: Mapping[str, str] | None, what: str
) -> None:
    """Raises a ValueError naming the first parameter of `params` missing from, extra to or
    shaped unlike `expected` (arrays or ShapeDtypeStructs); `names` maps jaxmerge paths to the
    checkpoint's own tensor names, quoted as well; `what` names the model in the message."""
    names = names or {}
    quote = lambda path: f"{path!r}" + (f" ({names[path]!r})" if path in names else "")  # noqa: E731
    want, got = _flat_shapes(expected), _flat_shapes(params)
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            raise ValueError(f"{source}: parameter {path!r} is missing")
        if path not in want:
            raise ValueError(f"{source}: parameter {quote(path)} is not part of {what}")
        if got[path] != want[path]:
            raise ValueError(
                f"{source}: parameter {quote(path)} has shape {got[path]}; the config implies "
                f"{want[path]}"
            )


def as_jax(tree: Tree, dtype) -> Tree:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def resample_pos_embedding(pos_embedding, num_patches: int, has_cls: bool) -> jax.Array:
    """Bilinearly resizes a (1, [1 +] N, D) position embedding to `num_patches` patch positions
    (a checkpoint trained at one image size, run at another).

    The class token's embedding, if any, is kept as it is; the patch grid is resized.
    """
    pos_embedding = jnp.asarray(pos_embedding)
    cls, grid = (pos_embedding[:, :1], pos_embedding[:, 1:]) if has_cls else (None, pos_embedding)
    old_side, new_side = int(round(grid.shape[1] ** 0.5)), int(round(num_patches**0.5))
    if old_side**2 != grid.shape[1] or new_side**2 != num_patches:
        raise ValueError(
            f"resample_pos_embedding: grids must be square; got {grid.shape[1]} -> {num_patches}"
        )
    if old_side != new_side:
        grid = grid.reshape(1, old_side, old_side, -1)
        grid = jax.image.resize(grid, (1, new_side, new_side, grid.shape[-1]), "bilinear")
        grid = grid.reshape(1, num_patches, -1)
    return grid if cls is None else jnp.concatenate([cls, grid], axis=1)
