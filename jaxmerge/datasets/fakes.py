"""Tiny fake copies of the paper's five downloads, in their original layouts.

    python -m jaxmerge.datasets.fakes --out /tmp/fake_downloads

writes, under one folder (a `manual_dir` every paper builder reads):

    FireRisk/{train,val}/<class folder>/<n>.png     firerisk
    UTKFace/<age>_<gender>_<race>_<date>.jpg.chip.jpg   utkface
    data/image/origin/<n>.jpg, data/label/label.lst  expw
    WFLW_images/<event>/<name>.jpg, WFLW_annotations/list_98pt_rect_attr_train_test/*.txt  wflw
    Galaxy10_DECals.h5                               galaxy10_decals

Each image encodes its label in its pixels (a solid colour), so the builders' tests can check
that every example carries the right label; the paper suite's dry run
(`experiments/configs/paper.py:dry_run=1`) trains, merges and scores on them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxmerge import extras

FIRERISK_FOLDERS = ("High", "Low", "Moderate", "Non-burnable", "Very_High", "Very_Low", "Water")
UTKFACE_AGES = (1, 2, 3, 9, 10, 25, 39, 45, 59, 60, 70, 116)


def save_image(path, array, fmt=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, format=fmt)


def solid(height, width, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (height, width, 3))


def firerisk(root, train_per_class: int = 2, val_per_class: int = 1, val_folders=None):
    """FireRisk/{train,val}/<folder>/<i>.png, 40x40, the red channel 30 x the fine class index.

    `val_folders`: the class folders that get validation images (default: all seven).
    """
    from jaxmerge.datasets import firerisk as builder

    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for folder in FIRERISK_FOLDERS:
            if split == "val" and val_folders is not None and folder not in val_folders:
                empty = pathlib.Path(root) / "FireRisk" / split / folder
                empty.mkdir(parents=True, exist_ok=True)
                continue
            fine = builder.FINE_NAMES.index(builder.fine_name(folder))
            for i in range(n):
                save_image(
                    pathlib.Path(root) / "FireRisk" / split / folder / f"{i}.png",
                    solid(40, 40, (30 * fine, 90, 60)),
                )


def utkface(root, ages: Sequence[int] = UTKFACE_AGES):
    """UTKFace/<age>_<gender>_<race>_<date>.jpg.chip.jpg (50x40, red = 2 x age) for each age,
    plus one file whose name lacks the race (skipped by the builder, as in the real download)."""
    for i, age in enumerate(ages):
        name = f"{age}_{i % 2}_{i % 5}_2017011617452{i:04d}.jpg.chip.jpg"
        save_image(pathlib.Path(root) / "UTKFace" / name, solid(50, 40, (age * 2, 0, 0)), "JPEG")
    bad = pathlib.Path(root) / "UTKFace/39_1_20170116174525125.jpg.chip.jpg"
    save_image(bad, solid(8, 8, 0), "JPEG")


def expw(root, photos: int = 10):
    """data/image/origin/<p>.jpg (60x80) with two faces each, filled with 30 x expression + 20,
    one partly outside the photo, and a third box entirely outside (skipped), in
    data/label/label.lst."""
    origin = pathlib.Path(root) / "data/image/origin"
    lines = []
    for p in range(photos):
        photo = np.zeros((60, 80, 3), np.uint8)
        for face_id, (top, left, right, bottom) in enumerate([(5, 10, 30, 25), (40, 70, 95, 75)]):
            expression = (p + face_id) % 7
            photo[max(top, 0) : bottom, left:right] = 30 * expression + 20
            lines.append(f"{p}.jpg {face_id} {top} {left} {right} {bottom} 0.9 {expression}")
        lines.append(f"{p}.jpg 2 100 100 120 120 0.5 3")
        save_image(origin / f"{p}.jpg", photo, "JPEG")
    (pathlib.Path(root) / "data/label").mkdir(parents=True, exist_ok=True)
    (pathlib.Path(root) / "data/label/label.lst").write_text("\n".join(lines) + "\n")


WFLW_BOX = (20, 10, 60, 40)  # x_min y_min x_max y_max


def wflw_landmarks() -> np.ndarray:
    """(98, 2) points on a line from (20, 10) to (60, 40) in the fake photo's pixels."""
    return np.stack([np.linspace(20, 60, 98), np.linspace(10, 40, 98)], axis=1)


def wflw_line(landmarks, box, attributes, name):
    numbers = [f"{v:g}" for v in np.ravel(landmarks)] + [str(v) for v in (*box, *attributes)]
    return " ".join(numbers + [name])


def wflw(root, train_faces: int = 2, test_faces: int = 1):
    """WFLW_images/1--Event/a.jpg (80x100, a white block at x 40..50, y 25..35) and the two
    annotation lists, each line 98 landmarks, the box, 6 attributes and the image name."""
    photo = np.zeros((80, 100, 3), np.uint8)
    photo[25:35, 40:50] = 255
    save_image(pathlib.Path(root) / "WFLW_images/1--Event/a.jpg", photo, "JPEG")
    folder = pathlib.Path(root) / "WFLW_annotations/list_98pt_rect_attr_train_test"
    folder.mkdir(parents=True, exist_ok=True)
    line = wflw_line(wflw_landmarks(), WFLW_BOX, (1, 0, 0, 1, 0, 1), "1--Event/a.jpg")
    (folder / "list_98pt_rect_attr_train.txt").write_text((line + "\n") * train_faces)
    (folder / "list_98pt_rect_attr_test.txt").write_text((line + "\n") * test_faces)


def galaxy10(root, labels: Sequence[int] = tuple(np.repeat(np.arange(10), 10))):
    """Galaxy10_DECals.h5 with `images` (N, 16, 16, 3) filled with 20 x label + 10, `ans` and
    `redshift`, as the real file's datasets."""
    h5py = extras.require("h5py")

    labels = np.asarray(labels, np.uint8)
    images = (20 * labels + 10)[:, None, None, None] * np.ones((1, 16, 16, 3), np.uint8)
    pathlib.Path(root).mkdir(parents=True, exist_ok=True)
    with h5py.File(pathlib.Path(root) / "Galaxy10_DECals.h5", "w") as f:
        f["images"], f["ans"] = images.astype(np.uint8), labels
        f["redshift"] = np.zeros(len(labels), np.float32)


def write_all(root, small_eval: bool = False) -> pathlib.Path:
    """All five fake downloads under `root`. `small_eval` keeps every eval split to one or two
    images (the dry run scores each of them dozens of times with a ViT-B/16)."""
    root = pathlib.Path(root)
    if small_eval:
        firerisk(root, val_folders=("Low", "Water"))
        galaxy10(root, labels=np.repeat([0, 1], 10))
    else:
        firerisk(root)
        galaxy10(root)
    utkface(root)
    expw(root)
    wflw(root)
    return root


def main(argv):
    from absl import flags

    del argv
    print(write_all(flags.FLAGS.out, flags.FLAGS.small_eval))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Folder to write the fake downloads into.", required=True)
    flags.DEFINE_bool("small_eval", False, "One or two images per eval split.")
    app.run(main)
