"""The inputs of a model's LoRA-capable layers, seen through flax's method interception: their
order in the forward pass and their Gram matrices on a set of images (what RegMean reads).

    paths = layer_inputs.forward_order(model_def, base, adapter, images.shape)
    grams = layer_inputs.input_grams(model_def, base, adapter, images, paths)

Every family builds its adapted layers from `models.layers.LoraDense`, whose `branch(x, train)`
receives the layer's input whether or not the layer holds factors, so this works on any family
without touching its code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.models.layers import LoraDense

Tree = Any
F32 = jnp.float32


def _layer_input_interceptor(record):
    """An interceptor calling `record(path, x)` with the input of every `LoraDense` call."""

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, LoraDense) and context.method_name == "branch":
            record("/".join(context.module.path), args[0])
        return next_fun(*args, **kwargs)

    return intercept


def forward_order(model_def, base: Tree, adapter: Tree, image_shape) -> list[str]:
    """The paths of every `LoraDense` layer in the order the forward pass first calls them
    (traced abstractly: nothing is computed)."""
    order: list[str] = []

    def record(path, x):
        del x
        if path not in order:
            order.append(path)

    def forward(base, adapter, images):
        with nn.intercept_methods(_layer_input_interceptor(record)):
            return model_def.apply({"params": base, "lora": adapter}, images)

    jax.eval_shape(forward, base, adapter, jax.ShapeDtypeStruct(tuple(image_shape), F32))
    return order


@functools.partial(jax.jit, static_argnames=("model_def", "paths"))
def _batch_grams(model_def, base, adapter, images, mask, paths):
    """({path: sum of x^T x over the rows of kept images}, {path: number of rows}); `mask`
    (B,) is 1 for a kept image, 0 for padding."""
    sums: dict[str, jax.Array] = {}
    rows: dict[str, jax.Array] = {}

    def record(path, x):
        if path not in paths:
            return
        x = x.astype(F32)
        keep = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        flat = (x * keep).reshape(-1, x.shape[-1])
        gram = jnp.matmul(flat.T, flat, precision="highest")
        count = mask.sum() * (flat.shape[0] // x.shape[0])
        sums[path] = sums[path] + gram if path in sums else gram
        rows[path] = rows[path] + count if path in rows else count

    with nn.intercept_methods(_layer_input_interceptor(record)):
        model_def.apply({"params": base, "lora": adapter}, images)
    return sums, rows


def input_grams(
    model_def,
    base: Tree,
    adapter: Tree,
    images: np.ndarray,
    paths: Sequence[str],
    batch_size: int = 64,
) -> dict[str, jax.Array]:
    """{path: G} for each path of `paths`: the mean Gram `X^T X / N` (in, in), float32, of
    that layer's inputs X (every token of every image a row) with `adapter` applied.

    The mean over rows, as FusionBench's RegMean hooks keep it. Images go through in
    batches of `batch_size`, the last one padded and masked, so one compile serves them all.
    """
    paths = tuple(paths)
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        raise ValueError("images: got none; allowed: at least one image of the task")
    batch_size = min(batch_size, len(images))
    sums, rows = None, None
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        kept = len(batch)
        mask = np.zeros(batch_size, np.float32)
        mask[:kept] = 1.0
        if kept < batch_size:
            padding = np.zeros((batch_size - kept,) + batch.shape[1:], np.float32)
            batch = np.concatenate([batch, padding])
        out = _batch_grams(model_def, base, adapter, batch, mask, paths)
        sums, rows = out if sums is None else jax.tree.map(jnp.add, (sums, rows), out)
    missing = sorted(set(paths) - set(sums or {}))
    if missing:
        raise ValueError(f"paths: {missing} are not LoRA-capable layers of the model")
    return {path: sums[path] / rows[path] for path in paths}
