"""scikit-learn's digits as a TFDS builder: 1,797 8x8 handwritten digits, no download needed.

Source: `sklearn.datasets.load_digits()` (the UCI "Optical Recognition of Handwritten Digits"
test set, bundled with scikit-learn), grey levels 0..16, stored as uint8 `round(v * 255 / 16)`.

Features: `image` uint8 (8, 8, 1), `label` ClassLabel 0..9 and `value` float32 (the digit as a
number, for a regression task on the same images).
Splits: `train` / `test`, 80 / 20 within each digit, seed 0 (1,438 / 359).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "test": 0.2}


@common.register
class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits: classification (`label`) and regression (`value`)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://scikit-learn.org/stable/datasets/toy_dataset.html",
            image=common.image_feature(8, 1),
            label=tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            value=tfds.features.Scalar(np.float32),
        )

    def _split_generators(self, dl_manager):
        load_digits = extras.require("sklearn.datasets").load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        splits = common.stratified_split(digits.target, FRACTIONS, SPLIT_SEED)
        return {
            name: self._generate_examples(images[idx], digits.target[idx], idx)
            for name, idx in splits.items()
        }

    def _generate_examples(self, images, targets, indices):
        for image, target, index in zip(images, targets, indices, strict=True):
            yield (
                int(index),
                {
                    "image": common.encode(image),
                    "label": int(target),
                    "value": np.float32(target),
                },
            )
