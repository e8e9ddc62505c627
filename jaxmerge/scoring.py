"""Scoring a head on a backbone over a task's eval split: the one scorer of train, evaluate and
the study.

Each eval step returns per-metric *sums* over the unmasked examples and their count; `average`
turns the sums of every batch into means, so padding never counts and every host's examples
count once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import input_pipeline, models, tasks

Tree = Any


def forward(model_def, head_def, params: Tree, base: Tree, images, train: bool, rng=None):
    """The head's outputs on the backbone: `params` holds "head" and, when trained, "lora"
    (an adapter on `base`) or "base" (a full copy that replaces `base`)."""
    variables = {"params": params.get("base", base)}
    if "lora" in params:
        variables["lora"] = params["lora"]
    rngs = {"dropout": rng} if train else {}
    pooled = model_def.apply(variables, images, train=train, rngs=rngs)["pooled"]
    return head_def.apply({"params": params["head"]}, pooled)


def make_eval_step(model_def, head_def, task: tasks.Task):
    """eval_step(params, base, batch) -> {metric: sum over unmasked examples, "count": n}."""
    kind, spec = task.head_kind, task.loss_spec

    def eval_step(params, base, batch):
        outputs = forward(model_def, head_def, params, base, batch["image"], False)
        mask = batch["mask"].astype(jnp.float32)
        sums = {k: (v * mask).sum() for k, v in kind.metrics(outputs, batch, spec).items()}
        return {**sums, "count": mask.sum()}

    return jax.jit(eval_step)


def average(step_sums: Iterable[dict]) -> dict[str, float]:
    """{metric: sum over batches / example count} | {"examples": count}, from eval-step sums.

    Each batch's sums are fetched as they come: multi-device CPU loops that never wait on a
    result can deadlock in a collective.
    """
    totals: dict[str, float] = {}
    for sums in step_sums:
        for name, value in jax.device_get(sums).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    count = totals.pop("count")
    return {name: value / count for name, value in totals.items()} | {"examples": int(count)}


def evaluate(eval_step, params: Tree, base: Tree, batches, mesh) -> dict[str, float]:
    """Averages each metric over every example of an eval split (padding masked out)."""
    params, base = jax.device_put((params, base), NamedSharding(mesh, P()))
    return average(
        eval_step(params, base, input_pipeline.shard_batch(batch, mesh)) for batch in batches
    )


def _cached_images(batch: dict, model_def, family) -> dict:
    """The batch as the scorer keeps it on the device: a bfloat16 ViT (a family with
    `images_in_compute_dtype`) casts its input to bfloat16 in the patch embedding before
    anything else reads it, so its images are kept in bfloat16 with the same results at half
    the memory (a paper study's six eval splits: 12 GB instead of 24)."""
    if family.images_in_compute_dtype and model_def.dtype == jnp.bfloat16:
        return {**batch, "image": np.asarray(batch["image"]).astype(jnp.bfloat16)}
    return batch


class Scorer:
    """Scores heads on backbones for one task, compiling once and reading the data once.

    `scorer(backbone, head)` -> {metric: mean over the eval split, "examples": n};
    `scorer(base, head, lora)` scores `head` on `base` with a 'lora' tree applied at every
    forward (a fused model's gated adapters, `jaxmerge.fusion`).
    """

    def __init__(
        self,
        task: tasks.Task,
        head_def,
        model_def,
        settings,
        split: str | None = None,
        family: str = "vit",
    ):
        """`settings`: the `run_config.DataSettings` the runs read their data with (a run's
        `parts.data`, a model folder's `model_folder.data_settings`); `family`: the model's."""
        self.task = task
        self.mesh = input_pipeline.data_mesh()
        self.eval_step = make_eval_step(model_def, head_def, task)
        batches = input_pipeline.eval_batches(task, settings, model_def.image_size, split)
        family = models.get(family)
        self.batches = [
            input_pipeline.shard_batch(_cached_images(batch, model_def, family), self.mesh)
            for batch in batches
        ]

    def __call__(self, backbone: Tree, head: Tree, lora: Tree | None = None) -> dict[str, float]:
        # Every device holds the whole backbone and head.
        params = {"base": backbone, "head": head} | ({} if lora is None else {"lora": lora})
        params = jax.device_put(params, NamedSharding(self.mesh, P()))
        return average(self.eval_step(params, None, batch) for batch in self.batches)


def run_scorer(run, model_def, split: str | None = None) -> Scorer:
    """A `Scorer` of a run's task and head (`runs.Run`), reading the data as the run did."""
    parts = run.parts
    return Scorer(run.task, run.head_def, model_def, parts.data, split, parts.model.family)
