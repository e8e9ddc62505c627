"""Digit localisation: a scikit-learn digit pasted at a random place and size on a black canvas.

Semi-synthetic keypoint data for the offline suite (the role WFLW landmarks play in the paper):
the digits are real (`sklearn.datasets.load_digits()`, as in `digits.py`), their placement is
drawn. Each digit's 8x8 image is resized (bilinear) to a side `s` drawn uniformly from
[`MIN_SIDE`, `MAX_SIDE`] pixels and pasted with its top-left corner `(left, top)` drawn uniformly
inside a `CANVAS` x `CANVAS` black canvas, so the whole digit is visible.

Features: `image` uint8 (32, 32, 1); `landmarks` float32 (2, 2), the box's top-left and
bottom-right corners as (x, y) in [0, 1] of the image width and height, the layout
`jaxmerge.input_pipeline` and `heads` use for landmarks; `label` the digit (ClassLabel 0..9).
Splits follow `digits.py` (80 / 20 within each digit, seed 0), so no test digit is seen in
training: `train` has `TRAIN_PLACEMENTS` = 2 placements of each training digit (2,876), `test`
one of each test digit (359). Placements use `numpy.random.default_rng([split seed, index])`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common, digits

CANVAS = 32
MIN_SIDE, MAX_SIDE = 10, 20
TRAIN_PLACEMENTS = 2


def place_digit(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pastes a uint8 (8, 8) digit on a black canvas; returns (canvas (C, C, 1), corners (2, 2)).

    `corners = [[left, top], [left + s, top + s]] / CANVAS`.
    """
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    top, left = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
    canvas = np.zeros((CANVAS, CANVAS, 1), np.uint8)
    canvas[top : top + side, left : left + side] = common.resize(image[..., None], side, side)
    corners = np.array([[left, top], [left + side, top + side]], np.float32) / CANVAS
    return canvas, corners


@common.register
class DigitBox(tfds.core.GeneratorBasedBuilder):
    """Two-point localisation (box corners) of a real handwritten digit on a canvas."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://scikit-learn.org/stable/datasets/toy_dataset.html",
            supervised_keys=("image", "landmarks"),
            image=common.image_feature(CANVAS, 1),
            landmarks=tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
            label=tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        )

    def _split_generators(self, dl_manager):
        load_digits = extras.require("sklearn.datasets").load_digits

        data = load_digits()
        images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
        splits = common.stratified_split(data.target, digits.FRACTIONS, digits.SPLIT_SEED)
        return {
            "train": self._generate_examples(images, data.target, splits["train"], 0, 2),
            "test": self._generate_examples(images, data.target, splits["test"], 1, 1),
        }

    def _generate_examples(self, images, targets, indices, split_seed, placements):
        for index in indices:
            for copy in range(placements):
                rng = np.random.default_rng([split_seed, int(index), copy])
                canvas, corners = place_digit(images[index], rng)
                yield (
                    f"{index}_{copy}",
                    {
                        "image": common.encode(canvas),
                        "landmarks": corners,
                        "label": int(targets[index]),
                    },
                )
