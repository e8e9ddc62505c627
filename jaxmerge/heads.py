"""Task heads and the loss and metric of each head kind.

A head is the paper's 2-layer MLP on the pooled ViT feature (head type "mlp"), or CLIP's
frozen zero-shot classifier from class-name text embeddings (type "zero_shot",
`jaxmerge.zero_shot`). Heads are never merged: a merged backbone carries every task's own
head. Each head kind fixes the output layout, the training loss and the evaluation metrics, as
pure functions of (outputs, batch), and how its outputs read as predictions (`decode`) and CSV
fields (`columns`, `flatten`), so no caller branches on a kind's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmerge import zero_shot


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


HEAD_TYPES = ("mlp", zero_shot.HEAD)  # `config.head.type`


def build(settings, task, width: int) -> nn.Module:
    """The head a run's `run_config.HeadSettings` ask for on a backbone whose pooled feature
    has `width`: `MlpHead(hidden, task.outputs)`, or the zero-shot head of `task` in
    `settings.zero_shot_file` (its parameters read by `init`, frozen in training).

    Raises:
      ValueError: naming `config.head.zero_shot_file` when the file's projection does not
        read a `width` feature (`run_config.resolve` checks the rest before anything loads).
    """
    if settings.type != zero_shot.HEAD:
        return MlpHead(settings.hidden, task.outputs)
    path = os.path.abspath(os.path.expanduser(settings.zero_shot_file))
    head = zero_shot.head_def(path, task.name)
    if head.width != width:
        raise ValueError(
            f"config.head.zero_shot_file: got {path!r}, whose visual_projection reads a "
            f"{head.width}-wide feature; allowed: a file made for this backbone (width {width})"
        )
    return head


def to_record(head_def: nn.Module) -> dict:
    """The head module as run metadata and model.json record it ({"type", "hidden",
    "outputs"}, plus the zero-shot head's sizes and file); `from_record` rebuilds it."""
    if isinstance(head_def, zero_shot.ZeroShotHead):
        return {
            "type": zero_shot.HEAD,
            "hidden": 0,
            "outputs": head_def.outputs,
            "width": head_def.width,
            "projection_dim": head_def.projection_dim,
            "file": head_def.path,
        }
    return {"type": "mlp", "hidden": head_def.hidden, "outputs": head_def.outputs}


def from_record(record: dict) -> nn.Module:
    """The head module of a `to_record` record, its parameters to be restored (a zero-shot
    head's file is not read again). A record without "type" (runs and model folders written
    before zero-shot heads) is an MLP head."""
    kind = record.get("type", "mlp")
    if kind == "mlp":
        return MlpHead(record["hidden"], record["outputs"])
    if kind == zero_shot.HEAD:
        return zero_shot.ZeroShotHead(record["outputs"], record["width"], record["projection_dim"])
    raise ValueError(f"head record: type {kind!r}; allowed: {HEAD_TYPES}")


# A model folder's task entry (`model_folder.task_info`): "outputs", "labels", "spec", ...
TaskRecord = Mapping[str, Any]
# (top, left, side) of the square each model input was cut from in its image.
Crop = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """How a head's outputs are trained and read. `loss` returns one value per example;
    `metrics` returns per-example values that `evaluate` averages over the unmasked examples.

    `decode(outputs, task, crops)` turns (B, outputs) raw head outputs into one readable
    prediction per image; `columns(task)` names its CSV fields (after "TASK.") and `flatten`
    gives a prediction's values under those names; `outputs_rule` says which output counts the
    kind can have (`check_outputs`); `labelled`: the outputs are classes with names;
    `spec_keys`: the loss-spec entries `decode` needs.
    """

    loss: Callable[[jax.Array, dict, dict], jax.Array]
    metrics: Callable[[jax.Array, dict, dict], dict[str, jax.Array]]
    main_metric: str
    higher_is_better: bool
    decode: Callable[[np.ndarray, TaskRecord, Sequence[Crop]], list[dict[str, Any]]]
    columns: Callable[[TaskRecord], list[str]]
    flatten: Callable[[Mapping[str, Any]], dict[str, Any]]
    outputs_allowed: Callable[[int], bool]
    outputs_rule: str
    labelled: bool = False
    spec_keys: tuple[str, ...] = ()  # what `decode` reads from the task's "spec"

    def check_outputs(self, outputs: int, field: str) -> None:
        """ValueError naming `field` unless this kind can have `outputs` outputs."""
        if not self.outputs_allowed(outputs):
            raise ValueError(f"{field}: got {outputs}; allowed: {self.outputs_rule}")


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


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _decode_classes(outputs, task, crops):
    """{"label": class name (or the index as text), "index", "probability": softmax max}."""
    del crops
    rows = []
    for p in _softmax(np.asarray(outputs, np.float64)):
        index = int(np.argmax(p))
        label = task["labels"][index] if task.get("labels") else str(index)
        rows.append({"label": label, "index": index, "probability": float(p[index])})
    return rows


def _decode_value(outputs, task, crops):
    """{"value": outputs * std + mean}: the loss standardised the target."""
    del crops
    spec = task["spec"]
    values = np.asarray(outputs, np.float64)[:, 0] * spec["std"] + spec["mean"]
    return [{"value": float(v)} for v in values]


def _decode_points(outputs, task, crops):
    """{"points": [[x, y], ...]} in pixels of the image: `x = left + u * side` for the
    (u, v) in [0, 1] of the square input cut from it at (top, left, side)."""
    del task
    rows = []
    for values, (top, left, side) in zip(np.asarray(outputs, np.float64), crops):
        points = values.reshape(-1, 2) * side + np.array([left, top], np.float64)
        rows.append({"points": points.round(2).tolist()})
    return rows


def _point_columns(task):
    return [f"{axis}{k}" for k in range(task["outputs"] // 2) for axis in "xy"]


def _flat_points(prediction):
    return {f"{a}{k}": v for k, xy in enumerate(prediction["points"]) for a, v in zip("xy", xy)}


HEAD_KINDS = {
    "classification": HeadKind(
        _classification_loss,
        _classification_metrics,
        "accuracy",
        True,
        decode=_decode_classes,
        columns=lambda task: ["label", "probability"],
        flatten=lambda p: {"label": p["label"], "probability": p["probability"]},
        outputs_allowed=lambda n: n >= 2,
        outputs_rule="at least 2 classes",
        labelled=True,
    ),
    "regression": HeadKind(
        _regression_loss,
        _regression_metrics,
        "mae",
        False,
        decode=_decode_value,
        columns=lambda task: ["value"],
        flatten=lambda p: {"value": p["value"]},
        outputs_allowed=lambda n: n == 1,
        outputs_rule="1 output (one value)",
        spec_keys=("mean", "std"),
    ),
    "landmarks": HeadKind(
        _landmark_loss,
        _landmark_metrics,
        "nme",
        False,
        decode=_decode_points,
        columns=_point_columns,
        flatten=_flat_points,
        outputs_allowed=lambda n: n >= 2 and n % 2 == 0,
        outputs_rule="an even count >= 2 (x, y per point)",
    ),
}


def head_kind(name: str) -> HeadKind:
    if name not in HEAD_KINDS:
        raise ValueError(f"head kind: got {name!r}; allowed: {sorted(HEAD_KINDS)}")
    return HEAD_KINDS[name]
