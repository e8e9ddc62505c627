"""WFLW, Wider Facial Landmarks in the Wild (Wu et al. 2018): 10,000 faces with 98 landmarks.

Original download layout (`WFLW_images.tar.gz` and `WFLW_annotations.tar.gz`, both extracted
into manual_dir):

    WFLW_images/<event>/<name>.jpg           e.g. 51--Dresses/51_Dresses_wearingdress_51_377.jpg
    WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt   7,500 faces
    WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt    2,500 faces

Each annotation line has 207 space-separated fields: 196 landmark coordinates
x0 y0 x1 y1 ... x97 y97 (pixels), the face box x_min y_min x_max y_max, 6 attribute flags
(pose, expression, illumination, make-up, occlusion, blur) and the image path relative to
WFLW_images/.

Crop: a square centred on the box, of side `round(max(box w, box h) * (1 + 2 * margin))` pixels
(margin = the config's `margin`, 0.1 by default), with corner `(round(cx - side / 2),
round(cy - side / 2))`; parts outside the photograph are black. The crop is resized to (S, S),
and each landmark is stored as `((x - left) / side, (y - top) / side)`: a position in [0, 1] of
the stored image's width and height (0 = its left/top edge, 1 = its right/bottom edge). Points
are not clipped; WFLW boxes enclose the landmarks, so with a margin >= 0 they fall in [0, 1].

Horizontal flips must both mirror x (x -> 1 - x) and swap left/right points:
`FLIP_PERMUTATION[i]` is the index whose mirrored point becomes point i.

Features: `image` uint8 (S, S, 3), `landmarks` float32 (98, 2) as (x, y), `attributes` int32 (6,).
Splits: the official `train` (7,500) / `test` (2,500).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge.datasets import common

NUM_LANDMARKS = 98
ATTRIBUTE_NAMES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")
ANNOTATION_FILES = {
    "train": "list_98pt_rect_attr_train.txt",
    "test": "list_98pt_rect_attr_test.txt",
}


def _mirror_pairs() -> list[tuple[int, int]]:
    """Left/right point pairs of the 98-point WFLW layout."""
    pairs = list(zip(range(0, 16), range(32, 16, -1), strict=True))  # jaw line, 16 is the chin
    pairs += zip(range(33, 38), range(46, 41, -1), strict=True)  # upper eyebrow edges
    pairs += zip(range(38, 42), range(50, 46, -1), strict=True)  # lower eyebrow edges
    pairs += [(55, 59), (56, 58)]  # nostrils; 51-54 (bridge) and 57 lie on the midline
    pairs += zip(range(60, 65), range(72, 67, -1), strict=True)  # eye corners and upper lids
    pairs += zip(range(65, 68), range(75, 72, -1), strict=True)  # lower lids
    pairs += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86)]  # outer lips; 79, 85 midline
    pairs += [(88, 92), (89, 91), (93, 95)]  # inner lips; 90, 94 midline
    pairs += [(96, 97)]  # pupils
    return pairs


def flip_permutation() -> np.ndarray:
    """int (98,) permutation p with flipped[i] = mirror(original[p[i]]); an involution."""
    perm = np.arange(NUM_LANDMARKS)
    for a, b in _mirror_pairs():
        perm[a], perm[b] = b, a
    return perm


FLIP_PERMUTATION = flip_permutation()


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotation line: landmarks (98, 2) in pixels, box (4,), attributes (6,), image."""

    landmarks: np.ndarray
    box: np.ndarray
    attributes: np.ndarray
    image_name: str


def parse_annotation_line(line: str) -> Annotation:
    """Parses the 207 fields of one WFLW annotation line (see the module docstring)."""
    fields = line.split()
    expected = 2 * NUM_LANDMARKS + 4 + len(ATTRIBUTE_NAMES) + 1
    if len(fields) != expected:
        raise ValueError(f"WFLW line must have {expected} fields, got {len(fields)}")
    numbers = np.asarray(fields[:-1], np.float64)
    return Annotation(
        landmarks=numbers[: 2 * NUM_LANDMARKS].reshape(NUM_LANDMARKS, 2),
        box=numbers[2 * NUM_LANDMARKS : 2 * NUM_LANDMARKS + 4],
        attributes=numbers[2 * NUM_LANDMARKS + 4 :].astype(np.int32),
        image_name=fields[-1],
    )


def crop_window(box: np.ndarray, margin: float) -> tuple[int, int, int]:
    """(top, left, side) in pixels of the square crop around `box` (x_min, y_min, x_max, y_max)."""
    x_min, y_min, x_max, y_max = box
    side = max(1, round(max(x_max - x_min, y_max - y_min) * (1 + 2 * margin)))
    left = round((x_min + x_max) / 2 - side / 2)
    top = round((y_min + y_max) / 2 - side / 2)
    return top, left, side


def crop_face(image: np.ndarray, annotation: Annotation, margin: float, size: int):
    """(uint8 (size, size, 3) crop, float32 (98, 2) landmarks normalised to the crop)."""
    top, left, side = crop_window(annotation.box, margin)
    crop = common.crop_with_padding(image, top, left, side, side)
    landmarks = (annotation.landmarks - np.array([left, top])) / side
    return common.resize(crop, size, size), landmarks.astype(np.float32)


def find_files(manual_dir) -> tuple[dict, object]:
    """({split: annotation path}, images folder) under manual_dir."""
    folders = [
        manual_dir / "WFLW_annotations" / "list_98pt_rect_attr_train_test",
        manual_dir / "list_98pt_rect_attr_train_test",
        manual_dir,
    ]
    annotations = {}
    for split, name in ANNOTATION_FILES.items():
        found = [folder / name for folder in folders if (folder / name).is_file()]
        if not found:
            raise ValueError(f"WFLW: {name} not found in {manual_dir} nor its annotation folders")
        annotations[split] = found[0]
    nested = manual_dir / "WFLW_images"
    return annotations, nested if nested.is_dir() else manual_dir


@dataclasses.dataclass
class WflwConfig(common.SizeConfig):
    """Stored image side `image_size` and crop `margin` (fraction of the box side, each side)."""

    margin: float = 0.1


@common.register
class Wflw(tfds.core.GeneratorBasedBuilder):
    """WFLW 98-point facial landmark regression on square face crops."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        WflwConfig(name=f"size{s}", image_size=s, description=f"{s}x{s} crops, margin 0.1")
        for s in common.PHOTO_SIZES
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download WFLW_images.tar.gz and WFLW_annotations.tar.gz (https://wywu.github.io/projects/LAB/
    WFLW.html) and extract both into manual_dir, giving manual_dir/WFLW_images/ and
    manual_dir/WFLW_annotations/list_98pt_rect_attr_train_test/.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return common.dataset_info(
            self,
            "https://wywu.github.io/projects/LAB/WFLW.html",
            supervised_keys=("image", "landmarks"),
            image=common.image_feature(size, 3, "jpeg"),
            landmarks=tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
            attributes=tfds.features.Tensor(shape=(len(ATTRIBUTE_NAMES),), dtype=np.int32),
        )

    def _split_generators(self, dl_manager):
        annotations, image_dir = find_files(dl_manager.manual_dir)
        return {
            split: self._generate_examples(path, image_dir) for split, path in annotations.items()
        }

    def _generate_examples(self, annotation_path, image_dir):
        config = self.builder_config
        lines = [line for line in annotation_path.read_text().splitlines() if line.strip()]
        for index, line in enumerate(lines):
            annotation = parse_annotation_line(line)
            where = f"WFLW {annotation_path} line {index + 1}"
            photo = common.load_rgb(common.file_inside(image_dir, annotation.image_name, where))
            image, landmarks = crop_face(photo, annotation, config.margin, config.image_size)
            yield (
                index,
                {
                    "image": common.encode(image, "jpeg"),
                    "landmarks": landmarks,
                    "attributes": annotation.attributes,
                },
            )
