"""FireRisk (Shen et al. 2023): 91,872 aerial NAIP images of the US in 7 wildfire-risk classes.

Original download layout (`FireRisk.zip`, extracted into manual_dir; the top `FireRisk/` folder
may be present or not):

    FireRisk/train/<class>/*.png    70,331 images, 320x320 RGB
    FireRisk/val/<class>/*.png      21,541 images
    <class> in High, Low, Moderate, Non-burnable, Very_High, Very_Low, Water

Class folders are matched case-insensitively with '-' and ' ' read as '_'.

The paper uses FireRisk as a 3-class task without listing the grouping; this builder defines it
(`COARSE_OF_FINE`) as: `no_risk` = Non-burnable + Water, `low` = Very_Low + Low + Moderate,
`high` = High + Very_High, so every image keeps a class.

Features: `image` uint8 (S, S, 3) (320 -> the config's `image_size`), `label` ClassLabel over
the 3 coarse classes, `fine_label` ClassLabel over the 7 original classes.
Splits: the original `train` and `validation` (the `val/` folder).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from jaxmerge.datasets import common

FINE_NAMES = ("very_low", "low", "moderate", "high", "very_high", "non_burnable", "water")
COARSE_NAMES = ("no_risk", "low", "high")
COARSE_OF_FINE = {
    "very_low": "low",
    "low": "low",
    "moderate": "low",
    "high": "high",
    "very_high": "high",
    "non_burnable": "no_risk",
    "water": "no_risk",
}
SPLIT_FOLDERS = {"train": "train", "validation": "val"}


def fine_name(folder_name: str) -> str:
    """Normalises a class folder name ('Non-burnable' -> 'non_burnable')."""
    return folder_name.strip().lower().replace("-", "_").replace(" ", "_")


def find_root(manual_dir):
    """The folder holding `train/` and `val/` (manual_dir or manual_dir/FireRisk)."""
    for root in (manual_dir / "FireRisk", manual_dir):
        if all((root / folder).is_dir() for folder in SPLIT_FOLDERS.values()):
            return root
    raise ValueError(f"FireRisk: no train/ and val/ folders in {manual_dir} or its FireRisk/")


@common.register
class Firerisk(tfds.core.GeneratorBasedBuilder):
    """FireRisk wildfire-risk classification: 3 coarse classes (`label`) and 7 (`fine_label`)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download FireRisk.zip (linked from https://github.com/CharmonyShen/FireRisk) and extract it
    into manual_dir, so that manual_dir/FireRisk/train/<class>/ and .../val/<class>/ exist.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://github.com/CharmonyShen/FireRisk",
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            label=tfds.features.ClassLabel(names=COARSE_NAMES),
            fine_label=tfds.features.ClassLabel(names=FINE_NAMES),
        )

    def _split_generators(self, dl_manager):
        root = find_root(dl_manager.manual_dir)
        return {
            split: self._generate_examples(root / folder) for split, folder in SPLIT_FOLDERS.items()
        }

    def _generate_examples(self, split_dir):
        size = self.builder_config.image_size
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            fine = fine_name(class_dir.name)
            if fine not in COARSE_OF_FINE:
                raise ValueError(
                    f"FireRisk class folder {class_dir.name!r} in {split_dir} is not one of "
                    f"{FINE_NAMES} (case and '-'/'_' ignored)"
                )
            for path in common.image_files(class_dir):
                image = common.file_image(path, size)
                yield (
                    f"{fine}/{path.name}",
                    {
                        "image": common.encode(image, "jpeg"),
                        "label": COARSE_NAMES.index(COARSE_OF_FINE[fine]),
                        "fine_label": FINE_NAMES.index(fine),
                    },
                )
