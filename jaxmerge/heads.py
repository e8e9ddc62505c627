"""Task heads and the loss and metric of each head kind.

A head is the paper's 2-layer MLP on the pooled ViT feature. Heads are never merged: a merged
backbone carries every task's own head. Each head kind fixes the output layout, the training
loss and the evaluation metrics, as pure functions of (outputs, batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class MlpHead(nn.Module):
    """outputs = W2 @ gelu(W1 @ pooled + b1) + b2; `hidden=0` gives a linear head."""

    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        x = pooled.astype(jnp.float32)
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x), approximate=False)
        return nn.Dense(self.outputs, name="out")(x)


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """How a head's outputs are read. `loss` returns one value per example; `metrics` returns
    per-example values that `evaluate` averages over the unmasked examples."""

    loss: Callable[[jax.Array, dict, dict], jax.Array]
    metrics: Callable[[jax.Array, dict, dict], dict[str, jax.Array]]
    main_metric: str
    higher_is_better: bool


def _classification_loss(logits, batch, spec):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[spec["target"]])


def _classification_metrics(logits, batch, spec):
    labels = batch[spec["target"]]
    return {
        "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        "loss": _classification_loss(logits, batch, spec),
    }


def _standardised(batch, spec):
    return (batch[spec["target"]].astype(jnp.float32) - spec["mean"]) / spec["std"]


def _regression_loss(outputs, batch, spec):
    """L1 (or squared) error on the standardised target, (y - mean) / std."""
    error = outputs[:, 0] - _standardised(batch, spec)
    return jnp.abs(error) if spec.get("loss", "l1") == "l1" else jnp.square(error)


def _regression_metrics(outputs, batch, spec):
    prediction = outputs[:, 0] * spec["std"] + spec["mean"]
    error = prediction - batch[spec["target"]].astype(jnp.float32)
    return {"mae": jnp.abs(error), "mse": jnp.square(error)}


def _landmark_loss(outputs, batch, spec):
    """Mean L1 over the K x 2 normalised coordinates."""
    target = batch[spec["target"]]
    return jnp.abs(outputs.reshape(target.shape) - target).mean(axis=(1, 2))


def normalised_mean_error(predicted, target, spec):
    """NME = mean_k ||p_k - t_k|| / d, with d the distance between the landmarks
    `spec["norm_points"]` (e.g. the outer eye corners, inter-ocular NME as WFLW reports), or
    `spec["norm_distance"]` (a fixed distance in normalised units) when given."""
    per_point = jnp.linalg.norm(predicted - target, axis=-1).mean(axis=-1)
    if "norm_points" in spec:
        i, j = spec["norm_points"]
        distance = jnp.linalg.norm(target[:, i] - target[:, j], axis=-1)
    else:
        distance = jnp.full(per_point.shape, spec.get("norm_distance", 1.0))
    return per_point / jnp.maximum(distance, 1e-6)


def _landmark_metrics(outputs, batch, spec):
    target = batch[spec["target"]]
    predicted = outputs.reshape(target.shape)
    return {
        "nme": normalised_mean_error(predicted, target, spec),
        "l1": _landmark_loss(outputs, batch, spec),
    }


HEAD_KINDS = {
    "classification": HeadKind(_classification_loss, _classification_metrics, "accuracy", True),
    "regression": HeadKind(_regression_loss, _regression_metrics, "mae", False),
    "landmarks": HeadKind(_landmark_loss, _landmark_metrics, "nme", False),
}


def head_kind(name: str) -> HeadKind:
    if name not in HEAD_KINDS:
        raise ValueError(f"head kind: got {name!r}; allowed: {sorted(HEAD_KINDS)}")
    return HEAD_KINDS[name]
