"""TFDS builders: each prepared as array_record in tmp_path and read back with tfds.data_source.

Manual builders run on tiny fake copies written here in their original download format (real
image files, a real HDF5 file, real annotation text); the offline builders run on their real
sources.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxmerge.datasets import (
    BUILDERS,
    expw,
    fakes,
    fashion_mnist,
    firerisk,
    textures,
    utkface,
    wflw,
)
from jaxmerge.datasets.prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_and_read(name, tmp_path, manual_dir=None, **kwargs):
    """{split: [example dicts]} of dataset `name` prepared under tmp_path/data."""
    data_dir = str(tmp_path / "data")
    builder = prepare(name, data_dir, None if manual_dir is None else str(manual_dir), **kwargs)
    out = {}
    for split in builder.info.splits:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
        out[split] = [source[i] for i in range(len(source))]
    return out


save_image, solid = fakes.save_image, fakes.solid


def test_registry_holds_every_builder():
    assert set(BUILDERS) == {
        "firerisk", "utkface", "expw", "wflw", "galaxy10_decals", "sklearn_digits",
        "fashion_mnist_idx", "skimage_textures", "lfw_subset", "image_folder", "digit_box",
        "photo_scenes", "gtsrb",
    }  # fmt: skip


# ---- offline builders, real data ----


def test_sklearn_digits(tmp_path):
    from sklearn.datasets import load_digits

    splits = prepare_and_read("sklearn_digits", tmp_path)
    target = load_digits().target
    assert {k: len(v) for k, v in splits.items()} == {"train": 1438, "test": 359}
    test_counts = np.bincount([ex["label"] for ex in splits["test"]], minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * np.bincount(target)))
    for ex in splits["train"][:50] + splits["test"][:50]:
        assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
        assert ex["value"] == np.float32(ex["label"])
    # grey levels 0..16 scaled to 0..255: every stored value is a multiple of 255/16, rounded
    levels = np.round(np.arange(17) * 255 / 16)
    assert np.isin(splits["test"][0]["image"], levels).all()


def test_lfw_subset_matches_skimage_crops(tmp_path):
    from skimage import data

    splits = prepare_and_read("lfw_subset", tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 160, "test": 40}
    assert sum(ex["label"] for ex in splits["test"]) == 20  # 20 faces, 20 non-faces
    crops = np.round(data.lfw_subset() * 255).astype(np.uint8)
    for ex in splits["test"]:
        index = int(np.argmin(np.abs(crops.astype(int) - ex["image"][..., 0]).sum(axis=(1, 2))))
        np.testing.assert_array_equal(crops[index], ex["image"][..., 0])  # PNG is lossless
        assert ex["label"] == int(index < 100)


def test_skimage_textures_patches_come_from_disjoint_regions(tmp_path):
    splits = prepare_and_read("skimage_textures", tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 320, "test": 80}
    brick = textures.load_photo("brick")
    cut = int(brick.shape[1] * textures.TRAIN_WIDTH_FRACTION)
    test_patches = [ex["image"][..., 0] for ex in splits["test"] if ex["label"] == 0]
    assert len(test_patches) == 16
    corners = textures.patch_corners(brick.shape[0], (cut, brick.shape[1]), 32, 16, seed=1)
    expected = {brick[t : t + 32, s : s + 32].tobytes() for t, s in corners}
    assert {p.tobytes() for p in test_patches} == expected
    assert corners[:, 1].min() >= cut  # no test pixel lies in the training region


@pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.DEBIAN_DIR),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install it)",
)
def test_fashion_mnist_idx_reads_the_debian_files(tmp_path):
    splits = prepare_and_read("fashion_mnist_idx", tmp_path, max_examples_per_split=20)
    images = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR, "t10k-images-idx3-ubyte")
    labels = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR, "t10k-labels-idx1-ubyte")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    got = sorted((ex["image"][..., 0].tobytes(), ex["label"]) for ex in splits["test"])
    want = sorted((images[i].tobytes(), int(labels[i])) for i in range(20))
    assert got == want


def test_fashion_mnist_idx_reads_a_manual_folder(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("t10k", 2)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (folder / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = np.arange(n, dtype=np.uint8)
        header = (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big")
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    np.testing.assert_array_equal(fashion_mnist.read_idx(folder, "t10k-labels-idx1-ubyte"), [0, 1])
    splits = prepare_and_read("fashion_mnist_idx", tmp_path, manual_dir=folder)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "test": 2}
    assert sorted(ex["label"] for ex in splits["train"]) == [0, 1, 2]


# ---- the paper's builders on fake copies in their original layouts ----


def test_firerisk_folders_and_3_class_grouping(tmp_path):
    fakes.firerisk(tmp_path / "raw")  # the red channel encodes the fine class
    splits = prepare_and_read("firerisk/size32", tmp_path, manual_dir=tmp_path / "raw")
    assert {k: len(v) for k, v in splits.items()} == {"train": 14, "validation": 7}
    coarse = {"very_low": 1, "low": 1, "moderate": 1, "high": 2, "very_high": 2,
              "non_burnable": 0, "water": 0}  # fmt: skip
    for ex in splits["train"] + splits["validation"]:
        assert ex["image"].shape == (32, 32, 3)
        fine = int(round(ex["image"][..., 0].mean() / 30))
        assert ex["fine_label"] == fine
        assert ex["label"] == coarse[firerisk.FINE_NAMES[fine]]
    assert sorted(ex["fine_label"] for ex in splits["validation"]) == list(range(7))


def test_utkface_ages_bins_and_skipped_names(tmp_path):
    ages = list(fakes.UTKFACE_AGES)
    expected_class = {1: 0, 2: 0, 3: 1, 9: 1, 10: 2, 25: 3, 39: 4, 45: 5, 59: 6, 60: 7, 70: 8,
                      116: 8}  # fmt: skip
    fakes.utkface(tmp_path / "raw", ages)  # and one file without a race: skipped
    splits = prepare_and_read("utkface/size32", tmp_path, manual_dir=tmp_path / "raw")
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "validation": 1, "test": 1}
    examples = [ex for split in splits.values() for ex in split]
    assert sorted(ex["age"] for ex in examples) == ages  # the unparsable name is skipped
    for ex in examples:
        age = int(ex["age"])
        assert ex["age"] == age and ex["age_class"] == expected_class[age]
        i = ages.index(age)
        assert (ex["gender"], ex["race"]) == (i % 2, i % 5)
        assert abs(float(ex["image"][..., 0].mean()) - 2 * age) < 4  # the image of that file
    assert utkface.AGE_CLASS_NAMES[0] == "0-2" and utkface.AGE_CLASS_NAMES[-1] == "70+"


def test_expw_crops_face_boxes_from_label_lst(tmp_path):
    # 10 photos; face 0 inside, face 1 partly outside (clipped): both filled with the expression
    # colour; a third box entirely outside: skipped
    fakes.expw(tmp_path / "raw", photos=10)
    splits = prepare_and_read("expw/size32", tmp_path, manual_dir=tmp_path / "raw")
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "validation": 2, "test": 2}
    for ex in [ex for split in splits.values() for ex in split]:
        assert ex["image"].shape == (32, 32, 3)
        assert abs(float(ex["image"].mean()) - (30 * ex["label"] + 20)) < 4
        assert np.isclose(ex["confidence"], 0.9)
    face = expw.parse_label_line("a.jpg 1 40 70 95 75 0.9 2")
    assert expw.crop_face(np.zeros((60, 80, 3), np.uint8), face).shape == (20, 10, 3)


def test_wflw_crop_and_landmark_normalisation(tmp_path):
    # a white block at x 40..50, y 25..35; landmarks from (20, 10) to (60, 40); 2 train, 1 test
    fakes.wflw(tmp_path / "raw", train_faces=2, test_faces=1)
    box = fakes.WFLW_BOX  # x_min y_min x_max y_max: w 40, h 30
    splits = prepare_and_read("wflw/size32", tmp_path, manual_dir=tmp_path / "raw")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "test": 1}
    ex = splits["test"][0]
    # margin 0.1: side = round(40 * 1.2) = 48, centre (40, 25) -> left 16, top 1
    assert wflw.crop_window(np.array(box, float), 0.1) == (1, 16, 48)
    np.testing.assert_allclose(ex["landmarks"][0], [(20 - 16) / 48, (10 - 1) / 48], atol=1e-6)
    np.testing.assert_allclose(ex["landmarks"][-1], [(60 - 16) / 48, (40 - 1) / 48], atol=1e-6)
    assert ex["landmarks"].shape == (98, 2) and ex["landmarks"].dtype == np.float32
    np.testing.assert_array_equal(ex["attributes"], [1, 0, 0, 1, 0, 1])
    # the block spans x (40-16)/48*32 = 16 .. 22.7 and y (25-1)/48*32 = 16 .. 22.7 in the crop
    assert ex["image"][19, 19].min() > 200 and ex["image"][5, 5].max() < 30


def test_wflw_flip_permutation_swaps_sides():
    perm = wflw.FLIP_PERMUTATION
    np.testing.assert_array_equal(perm[perm], np.arange(98))  # an involution
    midline = {16, 51, 52, 53, 54, 57, 79, 85, 90, 94}
    assert set(np.flatnonzero(perm == np.arange(98))) == midline
    assert perm[0] == 32 and perm[60] == 72 and perm[96] == 97 and perm[38] == 50


def test_galaxy10_decals_h5(tmp_path):
    fakes.galaxy10(tmp_path / "raw", labels=np.repeat(np.arange(10), 10))  # 20 x label + 10
    splits = prepare_and_read("galaxy10_decals/size32", tmp_path, manual_dir=tmp_path / "raw")
    assert {k: len(v) for k, v in splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert sorted(ex["label"] for ex in splits["test"]) == list(range(10))
    for ex in splits["validation"]:
        assert ex["image"].shape == (32, 32, 3)
        assert abs(float(ex["image"].mean()) - (20 * ex["label"] + 10)) < 3


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_image_folder(tmp_path, layout):
    colours = {"cat": (200, 10, 10), "dog": (10, 10, 200)}
    for name, rgb in colours.items():
        if layout == "flat":
            for i in range(5):
                save_image(tmp_path / "raw" / name / f"{i}.png", solid(30, 50, rgb))
        else:
            for split, n in (("train", 3), ("val", 1), ("test", 2)):
                for i in range(n):
                    save_image(tmp_path / "raw" / split / name / f"{i}.jpg", solid(30, 50, rgb))
    splits = prepare_and_read("image_folder/size32", tmp_path, manual_dir=tmp_path / "raw")
    want = {"train": 8, "test": 2} if layout == "flat" else {"train": 6, "validation": 2, "test": 4}
    assert {k: len(v) for k, v in splits.items()} == want
    assert BUILDERS["image_folder"](config="size32", data_dir=str(tmp_path / "data")).info.features[
        "label"
    ].names == ["cat", "dog"]
    for ex in splits["train"]:
        red_first = ex["image"][..., 0].mean() > ex["image"][..., 2].mean()
        assert red_first == (ex["label"] == 0)


# ---- prepare() and the command line ----


def test_prepare_rejects_unknown_name_config_and_missing_manual_dir(tmp_path):
    with pytest.raises(ValueError, match="dataset='nope' is unknown; known: .*utkface"):
        prepare("nope", str(tmp_path))
    with pytest.raises(ValueError, match="config='size7' is unknown for wflw"):
        prepare("wflw/size7", str(tmp_path))
    with pytest.raises(ValueError, match="dataset wflw needs manual_dir"):
        prepare("wflw", str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        prepare("expw", str(tmp_path), manual_dir=str(tmp_path / "missing"))


def test_cli_reports_one_line_errors(tmp_path):
    command = [sys.executable, "-m", "jaxmerge", "prepare", f"--data_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = subprocess.run([*command, "--dataset=nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "error: dataset='nope' is unknown" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    good = subprocess.run(
        [*command, "--dataset=lfw_subset"], env=env, capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert "prepared lfw_subset/1.0.0" in good.stdout
