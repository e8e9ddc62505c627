"""ExpW, Expression in-the-Wild (Zhang et al. 2018): 91,793 faces in 7 expression classes.

Original download layout (the archive `origin.7z.001..` unpacked to `origin/`, plus the label
file; searched in manual_dir, manual_dir/data and their `image/` and `label/` subfolders):

    origin/<image_name>.jpg     the full photographs, several faces each
    label.lst                   one face per line:
        image_name face_id top left right bottom confidence expression

with the face box in pixels (rows top..bottom, columns left..right of `image_name`), the
detector's confidence, and expression 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise,
6 neutral. Each face is cropped to its box (clipped to the photograph) and resized to
(S, S); a box with no area inside the photograph is skipped.

Features: `image` uint8 (S, S, 3), `label` ClassLabel over `CLASS_NAMES`, `confidence`
float32.
Splits (no official one): `train` / `validation` / `test`, 80 / 10 / 10 over photographs (all
faces of one photograph land in the same split), seed 0.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge.datasets import common

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclasses.dataclass(frozen=True)
class Face:
    """One line of label.lst."""

    image_name: str
    face_id: int
    top: int
    left: int
    right: int
    bottom: int
    confidence: float
    expression: int


def parse_label_line(line: str) -> Face:
    """Parses `image_name face_id top left right bottom confidence expression`."""
    fields = line.split()
    if len(fields) != 8:
        raise ValueError(f"label.lst line must have 8 fields, got {len(fields)}: {line!r}")
    name, face_id, top, left, right, bottom, confidence, expression = fields
    face = Face(
        name, int(face_id), int(top), int(left), int(right), int(bottom),
        float(confidence), int(expression),
    )  # fmt: skip
    if not 0 <= face.expression < len(CLASS_NAMES):
        raise ValueError(f"expression must be in 0..6, got {face.expression}: {line!r}")
    return face


def crop_face(image: np.ndarray, face: Face) -> np.ndarray | None:
    """image[top:bottom, left:right] clipped to the image; None when nothing is left."""
    height, width = image.shape[:2]
    top, bottom = max(face.top, 0), min(face.bottom, height)
    left, right = max(face.left, 0), min(face.right, width)
    if bottom <= top or right <= left:
        return None
    return image[top:bottom, left:right]


def find_files(manual_dir):
    """(label.lst path, origin/ folder) in the layouts listed in the module docstring."""
    roots = [manual_dir, manual_dir / "data", manual_dir / "ExpW", manual_dir / "ExpW" / "data"]
    labels = [r / sub / "label.lst" for r in roots for sub in ("", "label")]
    origins = [r / sub / "origin" for r in roots for sub in ("", "image")]
    label_path = next((p for p in labels if p.is_file()), None)
    origin_dir = next((p for p in origins if p.is_dir()), None)
    if label_path is None or origin_dir is None:
        raise ValueError(f"ExpW: label.lst and origin/ not found under {manual_dir}")
    return label_path, origin_dir


@common.register
class Expw(tfds.core.GeneratorBasedBuilder):
    """ExpW facial expression classification on face crops."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download ExpW from its project page (CUHK MMLab, "From Facial Expression Recognition to
    Interpersonal Relation Prediction"): unpack origin.7z.* into manual_dir/image/origin/ and put
    label.lst into manual_dir/label/ (the flat layout manual_dir/origin/, manual_dir/label.lst
    works too).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            "https://mmlab.ie.cuhk.edu.hk/projects/socialrelation/index.html",
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            label=tfds.features.ClassLabel(names=CLASS_NAMES),
            confidence=tfds.features.Scalar(np.float32),
        )

    def _split_generators(self, dl_manager):
        label_path, origin_dir = find_files(dl_manager.manual_dir)
        faces_by_image = collections.defaultdict(list)
        for line in label_path.read_text().splitlines():
            if line.strip():
                face = parse_label_line(line)
                faces_by_image[face.image_name].append(face)
        splits = common.split_items(list(faces_by_image), FRACTIONS, SPLIT_SEED)
        return {
            name: self._generate_examples(origin_dir, [faces_by_image[i] for i in sorted(images)])
            for name, images in splits.items()
        }

    def _generate_examples(self, origin_dir, faces_per_image):
        size = self.builder_config.image_size
        for faces in faces_per_image:
            name = faces[0].image_name
            photo = common.load_rgb(common.file_inside(origin_dir, name, "ExpW label.lst"))
            for face in faces:
                crop = crop_face(photo, face)
                if crop is None:
                    continue
                yield (
                    f"{face.image_name}/{face.face_id}",
                    {
                        "image": common.encode(common.resize(crop, size, size), "jpeg"),
                        "label": face.expression,
                        "confidence": np.float32(face.confidence),
                    },
                )
