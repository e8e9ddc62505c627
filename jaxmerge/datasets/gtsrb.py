"""GTSRB (Stallkamp et al. 2012): German traffic signs in 43 classes, from the official download.

TFDS has no GTSRB builder. Original download layout (the three zips of the benchmark's final
release, extracted into manual_dir):

    GTSRB_Final_Training_Images.zip -> GTSRB/Final_Training/Images/<00000..00042>/*.ppm
                                       (39,209 images, with GT-<class>.csv in each folder)
    GTSRB_Final_Test_Images.zip     -> GTSRB/Final_Test/Images/*.ppm (12,630 images)
    GTSRB_Final_Test_GT.zip         -> GT-final_test.csv (`Filename;Width;Height;Roi.X1;
                                       Roi.Y1;Roi.X2;Roi.Y2;ClassId`, ';'-separated)

GT-final_test.csv may also sit in GTSRB/ or GTSRB/Final_Test/Images/. Images (15 to 250 px,
not square) are squashed to the config's size without cropping, as torchvision's GTSRB with a
resize does for the merging benchmarks.

Features: `image` uint8 (S, S, 3), `label` ClassLabel over `CLASS_NAMES`.
Splits: `train` (Final_Training) and `test` (Final_Test).
"""

from __future__ import annotations

import csv

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge.datasets import common

CLASS_NAMES = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
TEST_LABELS = "GT-final_test.csv"


def read_ppm(path) -> np.ndarray:
    return common.load_rgb(path)


def find_root(manual_dir):
    """The folder holding `Final_Training/` and `Final_Test/` (manual_dir/GTSRB or manual_dir)."""
    for root in (manual_dir / "GTSRB", manual_dir):
        if (root / "Final_Training" / "Images").is_dir() and (root / "Final_Test").is_dir():
            return root
    raise ValueError(
        f"GTSRB: no GTSRB/Final_Training/Images/ and GTSRB/Final_Test/ in {manual_dir}; "
        "extract GTSRB_Final_Training_Images.zip and GTSRB_Final_Test_Images.zip there"
    )


def test_labels(manual_dir, root) -> dict[str, int]:
    """{file name: class} from GT-final_test.csv (from GTSRB_Final_Test_GT.zip)."""
    for folder in (manual_dir, root, root / "Final_Test" / "Images"):
        path = folder / TEST_LABELS
        if path.is_file():
            rows = list(csv.DictReader(path.read_text().splitlines(), delimiter=";"))
            if not rows or "ClassId" not in rows[0]:
                raise ValueError(f"GTSRB: {path} has no ClassId column (the GT zip's file)")
            return {row["Filename"]: int(row["ClassId"]) for row in rows}
    raise ValueError(
        f"GTSRB: no {TEST_LABELS} in {manual_dir}; extract GTSRB_Final_Test_GT.zip there"
    )


@common.register
class Gtsrb(tfds.core.GeneratorBasedBuilder):
    """GTSRB traffic-sign classification, 43 classes."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and
    GTSRB_Final_Test_GT.zip (https://benchmark.ini.rub.de/gtsrb_dataset.html) and extract all
    three into manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://benchmark.ini.rub.de/gtsrb_dataset.html",
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            label=tfds.features.ClassLabel(names=CLASS_NAMES),
        )

    def _split_generators(self, dl_manager):
        manual_dir = dl_manager.manual_dir
        root = find_root(manual_dir)
        labels = test_labels(manual_dir, root)
        train = [
            (path, int(folder.name))
            for folder in sorted((root / "Final_Training" / "Images").iterdir())
            if folder.is_dir() and folder.name.isdigit()
            for path in sorted(folder.glob("*.ppm"))
        ]
        test_dir = root / "Final_Test" / "Images"
        test_dir = test_dir if test_dir.is_dir() else root / "Final_Test"
        test = []
        for path in sorted(test_dir.glob("*.ppm")):
            if path.name not in labels:
                raise ValueError(f"GTSRB: {path.name} has no row in {TEST_LABELS}")
            test.append((path, labels[path.name]))
        for split, items in (("train", train), ("test", test)):
            if not items:
                raise ValueError(f"GTSRB: no .ppm images for the {split} split under {root}")
            if bad := [c for _, c in items if not 0 <= c < len(CLASS_NAMES)]:
                raise ValueError(f"GTSRB: class {bad[0]} outside 0..{len(CLASS_NAMES) - 1}")
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, items):
        size = self.builder_config.image_size
        for path, label in items:
            image = common.resize(read_ppm(path), size, size)
            yield (
                f"{path.parent.name}/{path.name}",
                {
                    "image": common.encode(image, "jpeg"),
                    "label": label,
                },
            )
