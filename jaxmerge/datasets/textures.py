"""Texture patches cut from scikit-image's bundled photographs: one class per photograph.

Sources (`skimage.data`, shipped inside scikit-image, no download): `brick()`, `grass()`,
`gravel()` (512x512 texture photographs), `moon()` (512x512 lunar surface) and
`hubble_deep_field()` (872x1000 RGB star field, converted to grey with ITU-R 601 luma weights).

Each photograph is cut at 3/4 of its width: training patches come only from the left part and
test patches only from the right part, so no test pixel is ever seen in training. Patch corners
are drawn uniformly inside each part with `numpy.random.default_rng(seed)`, seed fixed per
(split, class), so the dataset is the same on every machine.

Features: `image` uint8 (S, S, 1) with S the config's `image_size` (32 by default), `label`
ClassLabel over `CLASS_NAMES`.
Splits: `train` (`train_per_class` = 64 per class) / `test` (`test_per_class` = 16 per class).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common

CLASS_NAMES = ("brick", "grass", "gravel", "moon", "star_field")
TRAIN_WIDTH_FRACTION = 0.75


def load_photo(class_name: str) -> np.ndarray:
    """The grey uint8 (H, W) scikit-image photograph behind one class."""
    data = extras.require("skimage.data")

    if class_name == "star_field":
        rgb = data.hubble_deep_field().astype(np.float64)
        return np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return getattr(data, class_name)()


def patch_corners(
    height: int, width_range: tuple[int, int], size: int, count: int, seed: int
) -> np.ndarray:
    """`count` (top, left) corners of size x size patches inside columns [lo, hi) of an image."""
    lo, hi = width_range
    if hi - lo < size or height < size:
        raise ValueError(f"patch size {size} does not fit a {height}x{hi - lo} region")
    rng = np.random.default_rng(seed)
    tops = rng.integers(0, height - size + 1, count)
    lefts = rng.integers(lo, hi - size + 1, count)
    return np.stack([tops, lefts], axis=1)


@dataclasses.dataclass
class TextureConfig(common.SizeConfig):
    """Patch side `image_size` and patches per class in each split."""

    image_size: int = 32
    train_per_class: int = 64
    test_per_class: int = 16


@common.register
class SkimageTextures(tfds.core.GeneratorBasedBuilder):
    """Five-class texture classification on patches of real photographs."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        TextureConfig(name="size32", image_size=32, description="32x32 patches"),
        TextureConfig(name="size64", image_size=64, description="64x64 patches"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://scikit-image.org/docs/stable/api/skimage.data.html",
            image=common.image_feature(self.builder_config.image_size, 1),
            label=tfds.features.ClassLabel(names=CLASS_NAMES),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.train_per_class),
            "test": self._generate_examples("test", config.test_per_class),
        }

    def _generate_examples(self, split: str, per_class: int):
        size = self.builder_config.image_size
        for label, class_name in enumerate(CLASS_NAMES):
            photo = load_photo(class_name)
            height, width = photo.shape
            cut = int(width * TRAIN_WIDTH_FRACTION)
            columns = (0, cut) if split == "train" else (cut, width)
            seed = 1000 * label + (0 if split == "train" else 1)
            for i, (top, left) in enumerate(patch_corners(height, columns, size, per_class, seed)):
                patch = photo[top : top + size, left : left + size, None]
                yield f"{class_name}_{i}", {"image": common.encode(patch), "label": label}
