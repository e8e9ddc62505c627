"""Galaxy10 DECals (Leung & Bovy, astroNN): 17,736 galaxy images in 10 morphology classes.

Original download layout: one HDF5 file `Galaxy10_DECals.h5` (put it in manual_dir) holding

    images    (17736, 256, 256, 3) uint8   g, r, z bands as RGB
    ans       (17736,)             uint8   class 0..9 (`CLASS_NAMES` order)
    ra, dec, redshift, pxscale     (17736,) float   (not used)

Features: `image` uint8 (S, S, 3) resized from 256 to the config's `image_size`, `label`
ClassLabel over `CLASS_NAMES`.
Splits (no official one): `train` / `validation` / `test`, 80 / 10 / 10 within each class,
seed 0.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge import extras
from jaxmerge.datasets import common

FILE_NAME = "Galaxy10_DECals.h5"
SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
CLASS_NAMES = (
    "disturbed", "merging", "round_smooth", "in_between_round_smooth", "cigar_shaped_smooth",
    "barred_spiral", "unbarred_tight_spiral", "unbarred_loose_spiral", "edge_on_without_bulge",
    "edge_on_with_bulge",
)  # fmt: skip


@common.register
class Galaxy10Decals(tfds.core.GeneratorBasedBuilder):
    """Galaxy morphology classification from the Galaxy10 DECals HDF5 file."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download {FILE_NAME} (about 2.5 GB) from the astroNN Galaxy10 DECals page
    (https://astronn.readthedocs.io/en/latest/galaxy10.html) and put it in manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://astronn.readthedocs.io/en/latest/galaxy10.html",
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            label=tfds.features.ClassLabel(names=CLASS_NAMES),
        )

    def _split_generators(self, dl_manager):
        path = dl_manager.manual_dir / FILE_NAME
        if not path.exists():
            raise ValueError(f"{FILE_NAME} not found in manual_dir {dl_manager.manual_dir}")
        with extras.require("h5py").File(path, "r") as f:
            labels = np.asarray(f["ans"])
        splits = common.stratified_split(labels, FRACTIONS, SPLIT_SEED)
        return {name: self._generate_examples(path, idx) for name, idx in splits.items()}

    def _generate_examples(self, path, indices):
        size = self.builder_config.image_size
        with extras.require("h5py").File(path, "r") as f:
            images, labels = f["images"], f["ans"]
            for index in indices:
                image = common.resize(np.asarray(images[index]), size, size)
                yield (
                    int(index),
                    {
                        "image": common.encode(image, "jpeg"),
                        "label": int(labels[index]),
                    },
                )
