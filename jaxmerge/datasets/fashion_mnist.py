"""Fashion-MNIST read from its four idx files, as shipped by Debian's `dataset-fashion-mnist`.

Layout (the original release, also what `apt-get install dataset-fashion-mnist` puts in
`/usr/share/datasets/fashion-mnist/`):

    train-images-idx3-ubyte.gz   60,000 x 28 x 28 uint8   (idx3: magic 2051, n, rows, cols)
    train-labels-idx1-ubyte.gz   60,000 uint8 in 0..9     (idx1: magic 2049, n)
    t10k-images-idx3-ubyte.gz    10,000 x 28 x 28
    t10k-labels-idx1-ubyte.gz    10,000

The files may also be uncompressed (same names without `.gz`). The folder is, in order of
preference: the config's `idx_dir`, the `manual_dir` given to `download_and_prepare` if it
holds the files, then the Debian package's folder.

Features: `image` uint8 (28, 28, 1), `label` ClassLabel (10 clothing classes).
Splits: the official `train` (60,000) / `test` (10,000).
(Named `fashion_mnist_idx` because TFDS already registers a downloading `fashion_mnist`.)
"""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxmerge.datasets import common

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "t_shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass
class IdxConfig(tfds.core.BuilderConfig):
    """`idx_dir`: the folder holding the four idx files (None: manual_dir, then Debian's)."""

    idx_dir: str | None = None


def _open(folder: epath.Path, stem: str):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        if (folder / name).exists():
            return opener(folder / name, "rb")
    raise ValueError(f"idx file {stem}[.gz] not found in {folder}")


def read_idx(folder, stem: str) -> np.ndarray:
    """Reads one idx file (`stem` or `stem.gz` in folder) as a uint8 array of its shape."""
    with _open(epath.Path(folder), stem) as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 in the third byte means unsigned bytes
        raise ValueError(f"{stem}: magic {magic:#x} is not an idx file of uint8")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _has_files(folder) -> bool:
    folder = epath.Path(folder)
    stems = [stem for pair in FILES.values() for stem in pair]
    return all((folder / s).exists() or (folder / (s + ".gz")).exists() for s in stems)


def find_idx_dir(config_dir: str | None, manual_dir) -> epath.Path:
    """The first of config_dir, manual_dir, DEBIAN_DIR that holds the files (see docstring)."""
    if config_dir is not None:
        if not _has_files(config_dir):
            raise ValueError(f"idx_dir={config_dir!r} does not hold the Fashion-MNIST idx files")
        return epath.Path(config_dir)
    for folder in (manual_dir, DEBIAN_DIR):
        if folder is not None and _has_files(folder):
            return epath.Path(folder)
    raise ValueError(
        f"Fashion-MNIST idx files not found in manual_dir={manual_dir} nor {DEBIAN_DIR}; "
        "run `apt-get install dataset-fashion-mnist` or pass the folder as manual_dir"
    )


@common.register
class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local idx files (10-class clothing classification)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [IdxConfig(name="default", description="idx files found automatically")]

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://github.com/zalandoresearch/fashion-mnist",
            image=common.image_feature(28, 1),
            label=tfds.features.ClassLabel(names=CLASS_NAMES),
        )

    def _split_generators(self, dl_manager):
        # dl_manager.manual_dir raises when the folder is missing; that is not an error here.
        manual = dl_manager._manual_dir
        folder = find_idx_dir(self.builder_config.idx_dir, manual)
        return {split: self._generate_examples(folder, *stems) for split, stems in FILES.items()}

    def _generate_examples(self, folder, images_stem, labels_stem):
        images, labels = read_idx(folder, images_stem), read_idx(folder, labels_stem)
        if len(images) != len(labels):
            raise ValueError(f"{images_stem} has {len(images)} images, {labels_stem} {len(labels)}")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": common.encode(image), "label": int(label)}
