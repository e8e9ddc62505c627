"""Face vs non-face on scikit-image's `lfw_subset`: 200 grey 25x25 crops, no download needed.

Source: `skimage.data.lfw_subset()` (shipped with scikit-image): 100 face crops from Labeled
Faces in the Wild followed by 100 non-face crops, float in [0, 1], stored as uint8
`round(v * 255)`.

Features: `image` uint8 (25, 25, 1), `label` ClassLabel ("non_face", "face").
Splits: `train` / `test`, 80 / 20 within each class, seed 0 (160 / 40).
(Named `lfw_subset` because TFDS already registers a downloading `lfw`.)
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "test": 0.2}
NUM_FACES = 100  # lfw_subset() lists the 100 faces first


@common.register
class LfwSubset(tfds.core.GeneratorBasedBuilder):
    """Binary face / non-face classification on real 25x25 crops."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://scikit-image.org/docs/stable/api/skimage.data.html",
            image=common.image_feature(25, 1),
            label=tfds.features.ClassLabel(names=["non_face", "face"]),
        )

    def _split_generators(self, dl_manager):
        data = extras.require("skimage.data")

        crops = data.lfw_subset()
        images = np.round(crops * 255.0).astype(np.uint8)[..., None]
        labels = (np.arange(len(images)) < NUM_FACES).astype(np.int64)
        splits = common.stratified_split(labels, FRACTIONS, SPLIT_SEED)
        return {name: self._generate_examples(images, labels, idx) for name, idx in splits.items()}

    def _generate_examples(self, images, labels, indices):
        for index in indices:
            yield int(index), {"image": common.encode(images[index]), "label": int(labels[index])}
