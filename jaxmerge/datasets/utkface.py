"""UTKFace (Zhang, Song & Qi 2017): 23,708 aligned and cropped faces labelled with age 0..116.

Original download layout (`UTKFace.tar.gz`, the "Aligned&Cropped Faces", extracted into
manual_dir; the top `UTKFace/` folder may be present or not):

    UTKFace/[age]_[gender]_[race]_[date&time].jpg.chip.jpg     200x200 RGB

with age an integer in years, gender 0 male / 1 female, race 0 White, 1 Black, 2 Asian,
3 Indian, 4 Others, and date&time `yyyymmddHHMMSSFFF`. The plain `.jpg` ending of the
in-the-wild archives is read the same way. A few files of the release lack a field (e.g.
`39_1_20170116174525125.jpg.chip.jpg`); files whose name does not parse are skipped.

One builder serves two tasks on the same images: age regression (`age`) and age
classification (`age_class`, bins `AGE_BINS`: [0, 3), [3, 10), [10, 20), [20, 30), [30, 40),
[40, 50), [50, 60), [60, 70), [70, inf) years).

Features: `image` uint8 (S, S, 3), `age` float32 (years), `age_class` ClassLabel (9 bins),
`gender` ClassLabel, `race` ClassLabel.
Splits (no official one): `train` / `validation` / `test`, 80 / 10 / 10 over file names, seed 0.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge.datasets import common

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
# Lower edges of the age classes in years; class i holds ages in [AGE_BINS[i], AGE_BINS[i+1]).
AGE_BINS = (0, 3, 10, 20, 30, 40, 50, 60, 70)
AGE_CLASS_NAMES = tuple(
    f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BINS, AGE_BINS[1:], strict=False)
) + (f"{AGE_BINS[-1]}+",)
GENDER_NAMES = ("male", "female")
RACE_NAMES = ("white", "black", "asian", "indian", "others")
NAME_PATTERN = re.compile(r"^(\d+)_([01])_([0-4])_\d+")


def age_class(age: float) -> int:
    """The `AGE_BINS` class of an age in years: the last bin whose lower edge is <= age."""
    if age < 0:
        raise ValueError(f"age must be >= 0, got {age}")
    return int(np.searchsorted(AGE_BINS, age, side="right") - 1)


def parse_name(file_name: str) -> tuple[int, int, int] | None:
    """(age, gender, race) from a UTKFace file name, or None when the name does not parse."""
    match = NAME_PATTERN.match(file_name)
    return None if match is None else tuple(int(g) for g in match.groups())


def find_image_dir(manual_dir):
    """manual_dir/UTKFace when it exists, else manual_dir."""
    nested = manual_dir / "UTKFace"
    return nested if nested.is_dir() else manual_dir


@common.register
class Utkface(tfds.core.GeneratorBasedBuilder):
    """UTKFace faces with age (regression) and age class, gender and race (classification)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download UTKFace.tar.gz ("Aligned&Cropped Faces", from https://susanqq.github.io/UTKFace/)
    and extract it into manual_dir, so that manual_dir/UTKFace/*.jpg.chip.jpg exist.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://susanqq.github.io/UTKFace/",
            supervised_keys=("image", "age"),
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            age=tfds.features.Scalar(np.float32),
            age_class=tfds.features.ClassLabel(names=AGE_CLASS_NAMES),
            gender=tfds.features.ClassLabel(names=GENDER_NAMES),
            race=tfds.features.ClassLabel(names=RACE_NAMES),
        )

    def _split_generators(self, dl_manager):
        image_dir = find_image_dir(dl_manager.manual_dir)
        names = [p.name for p in common.image_files(image_dir) if parse_name(p.name)]
        if not names:
            raise ValueError(f"UTKFace: no [age]_[gender]_[race]_[date].jpg files in {image_dir}")
        splits = common.split_items(names, FRACTIONS, SPLIT_SEED)
        return {name: self._generate_examples(image_dir, files) for name, files in splits.items()}

    def _generate_examples(self, image_dir, file_names):
        size = self.builder_config.image_size
        for file_name in file_names:
            age, gender, race = parse_name(file_name)
            image = common.file_image(image_dir / file_name, size)
            yield (
                file_name,
                {
                    "image": common.encode(image, "jpeg"),
                    "age": np.float32(age),
                    "age_class": age_class(age),
                    "gender": gender,
                    "race": race,
                },
            )
