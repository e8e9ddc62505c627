"""The offline suite's semi-synthetic builders, prepared for real and read back."""

import numpy as np
import tensorflow_datasets as tfds

from jaxmerge.datasets import digit_box, photo_scenes, prepare


def read(name, tmp_path):
    builder = prepare.prepare(name, str(tmp_path))
    return {
        split: tfds.data_source(name, split=split, data_dir=str(tmp_path))
        for split in builder.info.splits
    }


def test_digit_box_corners_enclose_the_digit(tmp_path):
    splits = read("digit_box", tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2876, "test": 359}
    for i in range(0, 359, 7):
        example = splits["test"][i]
        (left, top), (right, bottom) = np.round(example["landmarks"] * digit_box.CANVAS)
        ink = np.argwhere(example["image"][..., 0] > 0)
        assert ink.size and digit_box.MIN_SIDE <= right - left <= digit_box.MAX_SIDE
        assert right - left == bottom - top
        assert ink[:, 0].min() >= top and ink[:, 0].max() < bottom
        assert ink[:, 1].min() >= left and ink[:, 1].max() < right


def test_photo_scenes_are_balanced_and_cut_from_the_photographs(tmp_path):
    splits = read("photo_scenes", tmp_path)
    n = len(photo_scenes.PHOTOS)
    sizes = {"train": n * photo_scenes.TRAIN_PER_PHOTO, "test": n * photo_scenes.TEST_PER_PHOTO}
    assert {k: len(v) for k, v in splits.items()} == sizes
    labels = [splits["test"][i]["label"] for i in range(len(splits["test"]))]
    assert np.bincount(labels).tolist() == [photo_scenes.TEST_PER_PHOTO] * n
    photo = photo_scenes.load_photo("camera")
    crops = list(photo_scenes.scene_crops(photo, (0, 300), 4, seed=0))
    rng = np.random.default_rng(0)
    for crop in crops:  # the crop is the resized region the seeded draws describe
        side = int(rng.integers(photo_scenes.MIN_SIDE, photo_scenes.MAX_SIDE + 1))
        top, left = int(rng.integers(0, 512 - side + 1)), int(rng.integers(0, 300 - side + 1))
        expected = photo_scenes.common.resize(photo[top : top + side, left : left + side], 32, 32)
        np.testing.assert_array_equal(crop, expected)
