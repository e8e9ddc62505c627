"""Bring your own data: image classification from one subfolder per class.

Layout, with manual_dir as the root (either form):

    root/<class>/*.{jpg,png,...}                  one split, cut 80 / 20 into train / test
                                                  within each class, seed 0
    root/{train,validation|val,test}/<class>/*    the given splits (any subset of the three)

Classes are the sorted union of the class folder names over all splits; images are read as
RGB, centre-cropped to a square and resized to the config's `image_size`. The class names are
only known once the root is read, so they are set on the `label` feature while preparing and
restored from the prepared dataset when reading.

Features: `image` uint8 (S, S, 3), `label` ClassLabel over the class folder names.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from jaxmerge.datasets import common

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "test": 0.2}
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def list_split_files(root) -> dict[str, dict[str, list]]:
    """{split: {class name: [image paths]}} for either layout of the module docstring."""
    given = {
        SPLIT_FOLDERS[p.name]: p for p in root.iterdir() if p.is_dir() and p.name in SPLIT_FOLDERS
    }
    if given:
        return {
            split: {c.name: common.image_files(c) for c in folder.iterdir() if c.is_dir()}
            for split, folder in given.items()
        }
    by_class = {c.name: common.image_files(c) for c in root.iterdir() if c.is_dir()}
    out: dict[str, dict[str, list]] = {split: {} for split in FRACTIONS}
    for class_index, (name, paths) in enumerate(sorted(by_class.items())):
        chosen = common.split_items([p.name for p in paths], FRACTIONS, SPLIT_SEED + class_index)
        for split, file_names in chosen.items():
            out[split][name] = [root / name / f for f in sorted(file_names)]
    return out


@common.register
class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """Classification over class-named folders of images under manual_dir."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Pass the root of your images as manual_dir: root/<class>/* or root/train/<class>/*,
    root/test/<class>/* (and optionally root/validation/ or root/val/).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": common.image_feature(self.builder_config.image_size, 3, "jpeg"),
                    "label": tfds.features.ClassLabel(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        files = list_split_files(root)
        class_names = sorted({name for classes in files.values() for name in classes})
        if not class_names:
            raise ValueError(f"image_folder: no class folders under {root}")
        self.info.features["label"].names = class_names
        return {split: self._generate_examples(classes) for split, classes in files.items()}

    def _generate_examples(self, classes):
        size = self.builder_config.image_size
        label_of = self.info.features["label"].str2int
        for class_name, paths in sorted(classes.items()):
            for path in paths:
                image = common.square_resize(common.load_rgb(path), size)
                yield (
                    f"{class_name}/{path.name}",
                    {
                        "image": common.encode(image, "jpeg"),
                        "label": label_of(class_name),
                    },
                )
