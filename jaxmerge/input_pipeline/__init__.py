"""The input pipeline: a task's prepared dataset turned into preprocessed, sharded batches.

Not to be confused with `datasets` (the TFDS builders that prepare raw files into the datasets
read here) nor with `tasks` (what each task learns: its dataset's name, target, head kind and
loss).

This package joins the task registry to the TF-free pipeline: it opens the task's dataset
(preparing it on first use: offline builders need nothing, the paper's need `manual_dir`),
picks the task's preprocessing for the model's image size, and places each host's slice of
the global batch on the ('data',) mesh. Its settings are a run's `run_config.DataSettings`,
resolved once from the config.

The pipeline itself, one job per module: `ops` (preprocessing functions), `loader` (resumable,
host-sliced batches), `prefetch` (a background thread), `workers` (worker
processes), `sources` (TFDS datasets by name).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import tasks
from jaxmerge.input_pipeline import loader, ops, sources


def open_split(task: tasks.Task, split: str, settings) -> loader.Source:
    """The task's split as a random-access source, preparing the dataset if it is not yet (or
    if its source folder changed since); `settings`: a `run_config.DataSettings`."""
    ensure_prepared(task.dataset, settings.data_dir, settings.manual_dir)
    return sources.open_source(task.dataset, split, settings.data_dir)


def ensure_prepared(dataset: str, directory: str, manual_dir: str = "") -> None:
    """Prepares one of jaxmerge's builders that is not prepared in `directory` yet (or, for a
    builder of the user's own files given its folder, whose folder changed since)."""
    from jaxmerge.datasets import BUILDERS, prepare

    builder_name = dataset.split("/")[0]
    if builder_name in BUILDERS:
        builder = BUILDERS[builder_name](
            config=dataset.partition("/")[2] or None, data_dir=directory
        )
        # A builder of the user's own files (image_folder) given its folder checks it on every
        # open: a changed folder is rebuilt, never read stale.
        rechecks = hasattr(builder, "source_change") and bool(manual_dir)
        if not builder.is_prepared() or rechecks:
            prepare.prepare(dataset, directory, manual_dir or None)


def image_steps(
    image_size: int,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
    augmentation: tuple[ops.Preprocess, ...] = (),
) -> ops.Preprocess:
    """A stored uint8 image -> the model's input: resized to (image_size, image_size)
    (antialiased bilinear; a no-op at that size), 3 channels, `augmentation`, then
    `(x / 255 - mean) / std`. Training, evaluation and `jaxmerge.prediction` (after
    `datasets.common.file_image` and `as_stored`) all prepare images with it."""
    return ops.compose(
        ops.resize(image_size), ops.to_rgb(), *augmentation, ops.normalize(mean, std)
    )


def default_preprocess(
    task: tasks.Task,
    image_size: int,
    train: bool,
    crop_padding: int = 0,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
):
    """`image_steps` with training augmentation (random crop with `crop_padding`, flips where
    the task allows them): by default [-1, 1]. Stored images are square (prepare crops the
    centre square), so the resize keeps their aspect ratio."""
    augmentation = []
    points = task.target if task.kind == "landmarks" else None  # moved with the image
    if train and crop_padding:
        augmentation.append(ops.random_crop(crop_padding, points))
    if train and task.flip:
        augmentation.append(ops.random_flip(task.flip_permutation, points))
    steps = image_steps(image_size, mean, std, tuple(augmentation))
    return ops.compose(steps, ops.keep("image", task.target))


def preprocess(
    task: tasks.Task, image_size: int, train: bool, crop_padding: int = 0, **normalization
):
    """The task's own preprocessing (`Task.preprocess`, which brings its own normalisation),
    or `default_preprocess` with `normalization` (`run_config.DataSettings.normalization`)."""
    if task.preprocess is not None:
        return task.preprocess(task, image_size, train, crop_padding)
    return default_preprocess(task, image_size, train, crop_padding, **normalization)


def train_batches(
    task: tasks.Task, settings, image_size: int, start_step: int = 0
) -> Iterator[dict]:
    """This host's slices of the global training batches, from `start_step` on (`settings`: a
    `run_config.DataSettings`)."""
    source = open_split(task, task.train_split, settings)
    return loader.train_batches(
        source,
        ops.Built(
            functools.partial(
                preprocess, task, image_size, True, settings.crop_padding, **settings.normalization
            )
        ),
        settings.batch_size,
        seed=settings.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=settings.threads,
        num_workers=settings.workers,
    )


def eval_batches(
    task: tasks.Task, settings, image_size: int, split: str | None = None
) -> Iterator[dict]:
    """Every example of the eval split once, with a `mask` marking padding."""
    source = open_split(task, split or task.eval_split, settings)
    return loader.eval_batches(
        source,
        ops.Built(functools.partial(preprocess, task, image_size, False, **settings.normalization)),
        settings.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=settings.threads,
        num_workers=settings.workers,
    )


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This host's slice of a global batch -> global arrays sharded along 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over every device of every host (or the given ones).

    Auto axes: XLA propagates the batch sharding through the model, so the model code needs no
    sharding annotations.
    """
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(
        np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
