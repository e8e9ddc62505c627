"""Photo scenes: which of eight real photographs a crop was cut from.

A classification on natural colour and grey scenes for the offline suite, dissimilar from the
digit tasks, the grey texture photographs of `textures.py` and the face crops of `lfw.py`.
Sources (shipped inside scikit-image, no download): `astronaut()`, `camera()`, `coffee()`,
`chelsea()`, `rocket()`, `clock()`, `coins()`, `page()`, as RGB (grey ones repeated over three
channels); the class is the photograph.

Each photograph is cut at `TRAIN_WIDTH_FRACTION` of its width: training crops come only from the
left part and test crops only from the right part, so no test pixel is seen in training (a test
crop shows a part of the scene never seen in training). A crop is a square of side drawn
uniformly from [`MIN_SIDE`, `MAX_SIDE`] pixels at a uniform place inside its part, resized
(bilinear) to 32x32. Draws use `numpy.random.default_rng([split seed, photo index])`.

Features: `image` uint8 (32, 32, 3), `label` ClassLabel over `PHOTOS`.
Splits: `train` (`TRAIN_PER_PHOTO` = 128 crops per photo, 1,024) / `test` (32 per photo, 256).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "clock", "coins", "page")
SIZE = 32
MIN_SIDE, MAX_SIDE = 48, 112
TRAIN_WIDTH_FRACTION = 0.6
TRAIN_PER_PHOTO, TEST_PER_PHOTO = 128, 32


def load_photo(name: str) -> np.ndarray:
    """The uint8 (H, W, 3) scikit-image photograph `name`."""
    data = extras.require("skimage.data")

    image = getattr(data, name)()
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def scene_crops(photo: np.ndarray, columns: tuple[int, int], count: int, seed):
    """`count` (SIZE, SIZE, 3) uint8 crops from columns [lo, hi) of a photograph."""
    rng = np.random.default_rng(seed)
    height = photo.shape[0]
    lo, hi = columns
    largest = min(MAX_SIDE, hi - lo, height)
    if largest < MIN_SIDE:
        raise ValueError(f"a {height}x{hi - lo} region cannot hold a {MIN_SIDE}-pixel crop")
    for _ in range(count):
        side = int(rng.integers(MIN_SIDE, largest + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(lo, hi - side + 1))
        yield common.resize(photo[top : top + side, left : left + side], SIZE, SIZE)


@common.register
class PhotoScenes(tfds.core.GeneratorBasedBuilder):
    """Eight-way scene classification on crops of real photographs."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://scikit-image.org/docs/stable/api/skimage.data.html",
            image=common.image_feature(SIZE, 3),
            label=tfds.features.ClassLabel(names=PHOTOS),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, TRAIN_PER_PHOTO),
            "test": self._generate_examples(1, TEST_PER_PHOTO),
        }

    def _generate_examples(self, split_seed: int, per_photo: int):
        for label, name in enumerate(PHOTOS):
            photo = load_photo(name)
            cut = int(photo.shape[1] * TRAIN_WIDTH_FRACTION)
            columns = (0, cut) if split_seed == 0 else (cut, photo.shape[1])
            crops = scene_crops(photo, columns, per_photo, [split_seed, label])
            for i, crop in enumerate(crops):
                yield f"{name}_{i}", {"image": common.encode(crop), "label": label}
