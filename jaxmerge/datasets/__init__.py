"""The dataset builders: raw files (downloads, your folders) prepared once into TFDS datasets.

Not to be confused with `input_pipeline` (which reads a prepared dataset back as batches) nor
with `tasks` (what is learned from a dataset). Importing this package registers the builders
with TFDS.

Each builder is prepared as array_record (`prepare.prepare(name, data_dir, manual_dir)`) and read
without TensorFlow through `tfds.data_source`. `BUILDERS` maps each TFDS name to its class:

  the paper's five (manual download): firerisk, utkface, expw, wflw, galaxy10_decals;
  the CLIP suite's GTSRB (manual download; the other seven are TFDS's own): gtsrb;
  offline: sklearn_digits, fashion_mnist_idx, skimage_textures, lfw_subset, digit_box,
  photo_scenes;
  your own folders: image_folder.
"""

from jaxmerge.datasets import (  # noqa: F401  (imported to register the builders)
    digit_box,
    digits,
    expw,
    fashion_mnist,
    firerisk,
    galaxy10,
    gtsrb,
    image_folder,
    lfw,
    photo_scenes,
    textures,
    utkface,
    wflw,
)
from jaxmerge.datasets.common import BUILDERS

__all__ = ["BUILDERS"]
