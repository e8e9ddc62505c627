"""CLIP zero-shot heads: fixed classifiers from the text embeddings of class-name prompts.

The merging literature (task arithmetic, TIES, AdaMerging, KnOTS; FusionBench's CLIP tables)
scores every task with CLIP's zero-shot head and never trains it:

    logits = scale * normalize(pooled @ visual_projection) @ classes.T

with `pooled` the tower's post-LayerNorm class token, `classes` (C, E) the unit-normalised text
embeddings of the task's class names (mean over prompt templates) and `scale` CLIP's
exp(logit_scale). `python -m jaxmerge zero_shot_heads` computes them once from a real CLIP
checkpoint (its text tower, in JAX) and writes one `.npz` per task set; this module reads it.
`scripts/make_zero_shot_heads.py` is the torch reference that command is checked against.

`ZeroShotHead` keeps the head frozen inside jaxmerge's trainer unchanged: its parameters are
1-D (AdamW's weight decay applies to matrices only) and read through `stop_gradient` (zero
gradients give Adam an update of exactly zero), so a training run leaves them as loaded and
its checkpoint carries them.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEAD = "zero_shot"  # the head's name in configs and run metadata


@functools.cache
def load_heads(path: str) -> dict:
    """{"scale": float, "visual_projection": (D, E), "classes": {task: (C, E)},
    "class_names": {task: [names]}} from a file of `jaxmerge.text_heads`.

    Raises:
      ValueError: a missing file or array, naming it.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"zero-shot heads: {path!r} does not exist; make it with "
            f"`python -m jaxmerge zero_shot_heads --model CLIP_FOLDER --output FILE`"
        )
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key in ("scale", "visual_projection"):
        if key not in arrays:
            raise ValueError(f"zero-shot heads {path!r}: missing array {key!r}")
    tasks = sorted(k.removesuffix("/classes") for k in arrays if k.endswith("/classes"))
    return {
        "scale": float(arrays["scale"]),
        "visual_projection": arrays["visual_projection"].astype(np.float32),
        "classes": {t: arrays[f"{t}/classes"].astype(np.float32) for t in tasks},
        "class_names": {t: [str(n) for n in arrays.get(f"{t}/class_names", ())] for t in tasks},
    }


def head_params(path: str, task: str) -> dict:
    """The `ZeroShotHead` parameters of `task` in the file at `path` (flat, see module doc)."""
    heads = load_heads(path)
    if task not in heads["classes"]:
        raise ValueError(
            f"zero-shot heads {path!r}: no task {task!r}; it holds {sorted(heads['classes'])}"
        )
    return {
        "projection": jnp.asarray(heads["visual_projection"].reshape(-1)),
        "classes": jnp.asarray(heads["classes"][task].reshape(-1)),
        "scale": jnp.asarray(heads["scale"], jnp.float32),
    }


class ZeroShotHead(nn.Module):
    """logits = scale * normalize(pooled @ projection) @ classes.T, every parameter frozen.

    Attributes:
      outputs: the number of classes C.
      width: the pooled feature's size D; projection_dim: E.
      path, task: where `init` reads the parameters (`head_params`); "" initialises zeros
        (for shapes, or for parameters restored from a checkpoint).
    """

    outputs: int
    width: int
    projection_dim: int
    path: str = ""
    task: str = ""

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        sizes = {
            "projection": self.width * self.projection_dim,
            "classes": self.outputs * self.projection_dim,
            "scale": None,
        }
        loaded = head_params(self.path, self.task) if self.path else None
        params = {}
        for name, size in sizes.items():
            shape = () if size is None else (size,)
            init = (lambda key, s, n=name: loaded[n]) if loaded else nn.initializers.zeros
            params[name] = jax.lax.stop_gradient(self.param(name, init, shape))
        projection = params["projection"].reshape(self.width, self.projection_dim)
        classes = params["classes"].reshape(self.outputs, self.projection_dim)
        embeds = pooled.astype(jnp.float32) @ projection
        embeds = embeds / jnp.maximum(jnp.linalg.norm(embeds, axis=-1, keepdims=True), 1e-12)
        return params["scale"] * embeds @ classes.T


def head_def(path: str, task: str) -> ZeroShotHead:
    """The `ZeroShotHead` of `task`, its sizes read from the file."""
    heads = load_heads(path)
    if task not in heads["classes"]:
        raise ValueError(
            f"zero-shot heads {path!r}: no task {task!r}; it holds {sorted(heads['classes'])}"
        )
    width, projection_dim = heads["visual_projection"].shape
    return ZeroShotHead(len(heads["classes"][task]), width, projection_dim, path, task)
