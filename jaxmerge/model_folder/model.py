"""A loaded model folder: one backbone (adapter folded in), a head per task, and the outputs
read in each task's units (`heads.HeadKind.decode`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmerge import heads, image_input, models
from jaxmerge.model_folder import multitask

Tree = Any


@dataclasses.dataclass(frozen=True)
class MultiTaskModel:
    """A loaded model: one backbone (adapter folded in) and a head per task.

    `tasks` and `info` are model.json's task entries and whole content; `merged` is the merged
    adapter (None when saved folded or loaded from a single run); `lora` is a fused model's
    gated adapter stack (`jaxmerge.fusion`), applied on `backbone` (the base) at every forward,
    None for a merged model.
    """

    model_def: Any
    backbone: Tree
    head_defs: Mapping[str, Any]  # `heads.from_record` modules
    head_params: Mapping[str, Tree]
    tasks: Mapping[str, Mapping[str, Any]]
    info: Mapping[str, Any]
    merged: Tree | None
    predictor: Callable = dataclasses.field(repr=False, compare=False)
    lora: Tree | None = None

    def predict(self, images) -> dict[str, np.ndarray]:
        """{task: (B, outputs)} raw head outputs for preprocessed images (B, S, S, 3)."""
        images = jnp.asarray(images)
        outputs = self.predictor(self.backbone, dict(self.head_params), images, self.lora)
        return {task: np.asarray(outputs[task]) for task in self.tasks}  # model.json's order

    def predict_images(
        self, rgb_images: Sequence[np.ndarray], batch_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Readable predictions (`outputs_to_predictions`) for upright uint8 (H, W, 3) images
        (`datasets.common.load_upright`), each prepared as its task's training images were
        (`image_input`): one backbone pass per distinct task input. `batch_size` pads the
        batch, so repeated calls compile once."""
        outputs = {}
        for record, names in image_input.input_groups(self.tasks, self.info["preprocessing"]):
            inputs = [
                image_input.model_input(rgb, self.info["preprocessing"], record)
                for rgb in rgb_images
            ]
            batch = np.zeros((max(batch_size or 0, len(inputs)), *inputs[0].shape), np.float32)
            batch[: len(inputs)] = np.stack(inputs)
            predicted = self.predict(batch)
            outputs.update({name: predicted[name][: len(inputs)] for name in names})
        shapes = [np.shape(rgb)[:2] for rgb in rgb_images]
        return outputs_to_predictions(outputs, self.tasks, shapes)


def build_model(model: Mapping[str, Any]):
    """The module model.json's "model" entry describes."""
    family = models.get(model["family"])
    return family.module(**model["kwargs"], dtype=jnp.dtype(model["dtype"]))


def assemble(
    model_def, backbone, head_params, info, merged, head_defs=None, lora=None
) -> MultiTaskModel:
    """The model of `info` (model.json's content) over its arrays; `head_defs` default to
    `heads.from_record` of each task's record; `lora` as in `MultiTaskModel`."""
    tasks = info["tasks"]
    if head_defs is None:
        # Folders written before head records held "hidden" and "outputs" only: MLP heads.
        head_defs = {t: heads.from_record(v.get("head", v)) for t, v in tasks.items()}
    predictor = multitask.make_predictor(model_def, head_defs)
    return MultiTaskModel(
        model_def, backbone, head_defs, head_params, tasks, info, merged, predictor, lora
    )


def outputs_to_predictions(
    outputs: Mapping[str, np.ndarray],
    tasks: Mapping[str, Mapping[str, Any]],
    image_shapes: Sequence[tuple[int, int]],
) -> list[dict[str, Any]]:
    """Raw head outputs -> one {task: prediction} per image, in the task's own units: each
    task's head kind decodes its outputs (`heads.HeadKind.decode`: a class name and its
    probability, a value, or landmark points in pixels of the upright input image, mapped back
    through the centre square the input was cut from).

    Args:
      outputs: {task: (B, outputs)}; tasks: model.json's task entries;
      image_shapes: (height, width) of each of the B upright input images before cropping.
    """
    crops = [image_input.input_crop(height, width) for height, width in image_shapes]
    rows: list[dict[str, Any]] = [{} for _ in image_shapes]
    for task, info in tasks.items():
        values = np.asarray(outputs[task], np.float64)[: len(image_shapes)]
        for row, prediction in zip(rows, heads.head_kind(info["kind"]).decode(values, info, crops)):
            row[task] = prediction
    return rows
