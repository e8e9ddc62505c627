"""Head refit after merging: retrain only a task's head on the merged (frozen) backbone.

This is what a user with labels would do after merging, so the study reports it on rows of its
own: it is not "merging without retraining". The backbone is frozen, so each training image's
pooled feature is computed once (evaluation preprocessing, no augmentation) and the head trains
on those features with its task's loss, starting from the head the task was trained with.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import heads
from jaxmerge import runs as runs_lib
from jaxmerge.learned.adam import adam_scan

Tree = Any


@functools.partial(jax.jit, static_argnums=0)
def _pooled(model_def, backbone, images):
    return model_def.apply({"params": backbone}, images)["pooled"]


def train_features(run, model_def, backbone: Tree, examples=None, batch_size: int = 512):
    """(pooled features (N, D), {target: values}) of the training split on `backbone`;
    `examples`: `runs.examples(run, model_def)`, if already read."""
    images, labels = runs_lib.examples(run, model_def) if examples is None else examples
    targets = {run.task.target: labels}
    starts = range(0, len(images), batch_size)
    features = [_pooled(model_def, backbone, images[i : i + batch_size]) for i in starts]
    return jnp.concatenate(features), jax.tree.map(jnp.asarray, targets)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _fit(head_def, kind_name, spec, steps, batch_size, learning_rate, head, features, targets, key):
    """`steps` Adam steps of the head on minibatches of (features, targets); compiled once per
    head, task and setting, whatever the backbone."""
    kind, spec, count = heads.head_kind(kind_name), dict(spec), features.shape[0]

    def loss(head, step_key):
        index = jax.random.randint(step_key, (min(batch_size, count),), 0, count)
        outputs = head_def.apply({"params": head}, features[index])
        return kind.loss(outputs, jax.tree.map(lambda v: v[index], targets), spec).mean()

    return adam_scan(loss, head, key, steps, learning_rate)[0]


def refit_head(
    run,
    model_def,
    backbone: Tree,
    *,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    examples=None,
) -> Tree:
    """The run's head retrained for `steps` Adam steps on `backbone`'s pooled features of the
    task's training split (minibatches drawn with `jax.random.key(seed)`); the backbone and the
    adapters are untouched. `examples`: `runs.examples(run, model_def)`, if already read."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an integer >= 1")
    features, targets = train_features(run, model_def, backbone, examples)
    task = run.task
    spec = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in task.loss_spec.items())
    )
    head = _fit(
        run.head_def,
        task.kind,
        spec,
        steps,
        batch_size,
        learning_rate,
        run.head,
        features,
        targets,
        jax.random.key(seed),
    )
    return jax.device_get(head)
