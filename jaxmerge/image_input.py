"""How an image becomes a model's input: the one chain shared by prepare, training and predict.

    file --datasets.common.file_image--> uint8 square at the task's stored size: decoded to
                                         RGB, upright by EXIF, centre square, resized
         --datasets.common.as_stored---> as the task's dataset stores it: grey for 1-channel
                                         data, the JPEG or PNG round trip
         --data.image_steps------------> float input: resized to the model's image size,
                                         3 channels, `(x / 255 - mean) / std`

`prepare` stores the first two steps' result for whole-image datasets (image_folder, utkface,
firerisk); training and evaluation read it back and apply the third; `jaxmerge.prediction`
applies all three to a file, so a file predicts exactly what its prepared example does. A model
folder records the last step in model.json's "preprocessing" and each task's stored form
(`dataset_input`) as the task's "input"; tasks stored alike share one backbone pass.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmerge import input_pipeline
from jaxmerge.datasets import common
from jaxmerge.input_pipeline import ops

FILE_STEPS = (
    "decoded to RGB (any PIL mode), turned upright by its EXIF orientation, centre-cropped to "
    "the largest square, resized (bilinear, antialiased) to the task's input size; grey for a "
    "1-channel input; encoded and decoded as the input's encoding (datasets.common.file_image, "
    "as_stored: what prepare stores)"
)


def dataset_input(dataset: str | None, data_dir: str) -> dict[str, Any] | None:
    """How a TFDS dataset stores its images: {"size", "channels", "encoding"} of its "image"
    feature (size None: any size), or None where the dataset cannot be opened."""
    if not dataset:
        return None
    try:
        import tensorflow_datasets as tfds

        import jaxmerge.datasets  # noqa: F401  (registers jaxmerge's builders)

        feature = tfds.builder(dataset, data_dir=data_dir).info.features["image"]
    except Exception:  # e.g. not prepared here: the folder then records no input
        return None
    height, width, channels = feature.shape
    return {
        "size": height if height == width else None,
        "channels": channels,
        "encoding": feature.encoding_format or "png",  # jaxmerge's builders store PNG bytes
    }


def describe(image_size: int, channels: int, normalization: Mapping[str, Sequence[float]]):
    """model.json's "preprocessing": the file steps in words, then `input_pipeline.image_steps`."""
    mean, std = list(normalization["mean"]), list(normalization["std"])
    return {
        "image_size": image_size,
        "channels": channels,
        "file": FILE_STEPS,
        "steps": ["file_image", "as_stored", "resize", "to_rgb", "normalize"],
        "resize": "bilinear, antialiased, the task's input size to image_size x image_size",
        "normalisation": "[-1, 1]" if all(v == 0.5 for v in mean + std) else "(x/255-mean)/std",
        "mean": mean,
        "std": std,
    }


def model_steps(preprocessing: Mapping[str, Any]) -> ops.Preprocess:
    """`input_pipeline.image_steps` as model.json records them. Folders written before `mean`
    and `std` were recorded scale to [-1, 1]."""
    mean, std = preprocessing.get("mean", [0.5]), preprocessing.get("std", [0.5])
    return input_pipeline.image_steps(preprocessing["image_size"], tuple(mean), tuple(std))


def task_input(task: Mapping[str, Any], preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """A task's recorded input; tasks without one (folders written before inputs were
    recorded, datasets not found) take RGB at the model's size, without a round trip."""
    recorded = dict(task.get("input") or {})
    return {
        "size": recorded.get("size") or preprocessing["image_size"],
        "channels": recorded.get("channels", 3),
        "encoding": recorded.get("encoding"),
    }


def input_groups(tasks: Mapping[str, Mapping[str, Any]], preprocessing) -> list[tuple]:
    """[(input, [task, ...]), ...]: the tasks that see the same input, in model.json's order."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, task in tasks.items():
        record = task_input(task, preprocessing)
        groups.setdefault(json.dumps(record, sort_keys=True), (record, []))[1].append(name)
    return list(groups.values())


def model_input(rgb: np.ndarray, preprocessing, record: Mapping[str, Any]) -> np.ndarray:
    """An upright uint8 (H, W, 3) image (`common.load_upright`) -> the float (S, S, 3) input
    of the tasks stored as `record` (`task_input`)."""
    square = common.square_resize(np.asarray(rgb, np.uint8), record["size"])
    stored = common.as_stored(square, record["channels"], record["encoding"])
    return model_steps(preprocessing)({"image": stored}, None)["image"]


def input_crop(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centre square a model input is cut from in an upright
    height x width image (`common.center_square_box`)."""
    return common.center_square_box(height, width)


def read_upright(path: str) -> tuple[np.ndarray | None, str | None]:
    """(the file's upright uint8 (H, W, 3) pixels, None), or (None, "Type: cause") for a file
    that cannot be decoded, named in one line on stderr: that file's problem, never the run's."""
    try:
        return common.load_upright(path), None
    # Any decoder failure (PIL raises OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError...).
    except Exception as error:
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"{type(error).__name__}: {cause}"
        print(f"predict: skipped {path}: {message}", file=sys.stderr)
        return None, message
