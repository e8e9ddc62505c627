"""Never silently wrong, never stuck: what jaxmerge does with unusual or broken input files.

Images in every mode PIL reads decode to the pixels a viewer shows; a prepared image folder
knows which folder and files it came from; bad image files and malformed PEFT adapter files
are named, one line each, before anything is written. Each case is one row of a table.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxmerge.datasets import BUILDERS, common
from jaxmerge.datasets.prepare import prepare
from jaxmerge.interop import peft as peft_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---- 1. every image mode decodes to its pixels ----


def png_16_bit(path, levels, colour_type: int):
    """Writes (H, W[, C]) levels as a 16-bit PNG by hand (PIL cannot write 16-bit RGB)."""
    levels = np.asarray(levels, ">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in levels)

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", levels.shape[1], levels.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def palette(pixels, colours, **save):
    def write(path):
        image = Image.new("P", (len(pixels), 1))
        image.putpalette([v for rgb in colours for v in rgb])
        image.putdata(pixels)
        image.save(path, **save)

    return write


def from_array(array, dtype=np.uint8, mode=None, **save):
    def write(path):
        Image.fromarray(np.asarray(array, dtype), mode=mode).save(path, **save)

    return write


def new_image(mode, pixels, **save):
    def write(path):
        image = Image.new(mode, (len(pixels), 1))
        image.putdata(pixels)
        image.save(path, **save)

    return write


def rotated_by_exif(path):
    """A 4x2 image, red left half and blue right half, whose EXIF orientation 6 says: turn it
    90 degrees clockwise (red on top) to show it. Its centre square tells the two apart."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.array([[RED, RED, BLUE, BLUE]] * 2, np.uint8)).save(path, exif=exif)


# (file name, writer, the mode PIL reads it in, the RGB pixels it must decode to)
MODES = [
    pytest.param("grey16.png", from_array([[65535, 32768, 257, 0]], np.uint16), "I;16",
                 [[[255] * 3, [128] * 3, [1] * 3, [0] * 3]], id="16-bit grey PNG (I;16)"),
    pytest.param("grey16.tif", from_array([[65535, 32768, 257, 0]], np.int32), "I",
                 [[[255] * 3, [128] * 3, [1] * 3, [0] * 3]], id="16-bit grey TIFF (I)"),
    pytest.param("rgb16.png", lambda p: png_16_bit(p, [[[65535, 32768, 0], [0, 65535, 32768]]], 2),
                 "RGB", [[[255, 128, 0], [0, 255, 128]]], id="16-bit RGB PNG"),
    pytest.param("p_index.png", palette([0, 1], [RED, GREEN], transparency=0), "P",
                 [[WHITE, GREEN]], id="palette, transparent index"),
    pytest.param("p_alpha.png", palette([0, 1], [(0, 0, 0), BLUE], transparency=b"\x80\xff"),
                 "P", [[[127] * 3, BLUE]], id="palette, alpha per entry"),
    pytest.param("cmyk.tif", new_image("CMYK", [(255, 0, 0, 0), (0, 0, 0, 0)]), "CMYK",
                 [[(0, 255, 255), WHITE]], id="CMYK"),
    pytest.param("la.png", new_image("LA", [(0, 128), (200, 255)]), "LA",
                 [[[127] * 3, [200] * 3]], id="LA on white"),
    pytest.param("rgba.png", new_image("RGBA", [(255, 0, 0, 128), (0, 0, 255, 0)]), "RGBA",
                 [[(255, 127, 127), WHITE]], id="RGBA on white"),
    pytest.param("key.png", new_image("L", [7, 100], transparency=7), "L",
                 [[WHITE, [100] * 3]], id="grey with a transparent level"),
    pytest.param("bilevel.png", new_image("1", [0, 1]), "1", [[[0] * 3, WHITE]], id="1-bit"),
    pytest.param("exif.png", rotated_by_exif, "RGB", [[RED, RED]] * 2 + [[BLUE, BLUE]] * 2,
                 id="EXIF orientation"),
]  # fmt: skip


@pytest.mark.parametrize("file_name, write, mode, pixels", MODES)
def test_every_image_mode_decodes_to_the_pixels_a_viewer_shows(
    tmp_path, file_name, write, mode, pixels
):
    path = tmp_path / file_name
    write(path)
    with Image.open(path) as image:
        assert image.mode == mode  # the case tests the mode it names
    got = common.load_rgb(path, exif_orientation=True)
    np.testing.assert_array_equal(got, np.asarray(pixels, np.uint8))


def test_image_folder_stores_the_decoded_pixels_of_every_mode(tmp_path):
    """Today's bug: a 16-bit PNG was prepared as an all-white image."""
    expected = {}
    for case in MODES:
        file_name, write, _, pixels = case.values
        folder = tmp_path / "raw" / "train" / case.id.replace(" ", "_")
        folder.mkdir(parents=True)
        write(folder / file_name)
        expected[folder.name] = common.square_resize(np.asarray(pixels, np.uint8), 32)
    builder = prepare("image_folder/size32", str(tmp_path / "data"), str(tmp_path / "raw"))
    source = builder.as_data_source("train")
    assert len(source) == len(MODES)
    for i in range(len(source)):
        example = source[i]
        want = expected[builder.info.features["label"].int2str(example["label"])]
        assert np.abs(example["image"].astype(int) - want).max() <= 8  # stored as JPEG


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0.5]], np.float32), "mode 'F' (32-bit float pixels) has no fixed white "
         "level; allowed: 8- or 16-bit grey, RGB, palette, CMYK and their alpha variants"),
        (np.array([[70000, 3]], np.int32), "grey levels span 3..70000; allowed: 16-bit levels "
         "0..65535 (a 32-bit image has no fixed white level: convert it to 8 or 16 bits first)"),
    ],
    ids=["float", "32-bit levels"],
)  # fmt: skip
def test_images_without_a_white_level_are_refused(tmp_path, array, expected):
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(ValueError) as error:
        common.load_rgb(tmp_path / "x.tif")
    assert str(error.value) == expected


# ---- 2. a prepared folder knows its source; named folders never collide ----


def write_folder(root, colours: dict, count: int = 3):
    """root/<class>/<i>.png, solid 8x8 images, one colour per class."""
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), rgb).save(root / name / f"{i}.png")


def read_all(name, data_dir):
    builder = tfds.builder(name, data_dir=str(data_dir))
    labels = builder.info.features["label"]
    return {
        split: sorted(labels.int2str(ex["label"]) for ex in builder.as_data_source(split))
        for split in builder.info.splits
    }


def test_preparing_from_another_folder_rebuilds_and_says_so(tmp_path, capsys):
    first, second, data = tmp_path / "first", tmp_path / "second", tmp_path / "data"
    write_folder(first, {"cat": RED, "dog": BLUE})
    write_folder(second, {"ant": RED, "bee": GREEN, "cow": BLUE})
    prepare("image_folder/size32", str(data), str(first))
    capsys.readouterr()
    prepare("image_folder/size32", str(data), str(second))
    version = data / "image_folder" / "size32" / "1.0.0"
    assert (
        f"image_folder/size32/1.0.0 was prepared from {first}, not {second}; rebuilding it "
        f"(the old data is in {version}.previous)"
    ) in capsys.readouterr().out.splitlines()
    assert read_all("image_folder/size32", data)["test"] == ["ant", "bee", "cow"]
    assert (version.parent / "1.0.0.previous" / "dataset_info.json").is_file()


def add_image(root):
    Image.new("RGB", (8, 8), GREEN).save(root / "cat" / "new.png")


def remove_image(root):
    os.remove(root / "dog" / "0.png")


def rewrite_image(root):  # same name and size, new content and mtime
    Image.new("RGB", (8, 8), GREEN).save(root / "cat" / "0.png")
    stat = os.stat(root / "cat" / "0.png")
    os.utime(root / "cat" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", [add_image, remove_image, rewrite_image])
def test_changed_images_rebuild_and_say_so(tmp_path, capsys, change):
    root, data = tmp_path / "raw", tmp_path / "data"
    write_folder(root, {"cat": RED, "dog": BLUE})
    prepare("image_folder/size32", str(data), str(root))
    change(root)
    capsys.readouterr()
    builder = prepare("image_folder/size32", str(data), str(root))
    assert (
        f"image_folder/size32/1.0.0 was prepared before images under {root} were added, "
        f"removed or changed; rebuilding it (the old data is in {builder.data_dir}.previous)"
    ) in capsys.readouterr().out.splitlines()
    assert builder.info.metadata["source"]["images"] == len(list(root.glob("*/*.png")))


def test_data_prepared_without_a_source_record_is_rebuilt(tmp_path, capsys):
    """Folders prepared before sources were recorded have no metadata.json."""
    root, data = tmp_path / "raw", tmp_path / "data"
    write_folder(root, {"cat": RED, "dog": BLUE})
    builder = prepare("image_folder/size32", str(data), str(root))
    os.remove(os.path.join(builder.data_dir, "metadata.json"))
    capsys.readouterr()
    prepare("image_folder/size32", str(data), str(root))
    assert (
        "image_folder/size32/1.0.0 has no record of the folder it was prepared from; rebuilding "
        f"it (the old data is in {builder.data_dir}.previous)"
    ) in capsys.readouterr().out.splitlines()


def test_unchanged_folder_is_not_rebuilt_even_with_new_junk(tmp_path, capsys):
    root, data = tmp_path / "raw", tmp_path / "data"
    write_folder(root, {"cat": RED, "dog": BLUE})
    builder = prepare("image_folder/size32", str(data), str(root))
    stored = {p: os.stat(p).st_mtime_ns for p in builder.data_path.iterdir()}
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / "Thumbs.db").write_bytes(b"\0")
    capsys.readouterr()
    again = prepare("image_folder/size32", str(data), str(root))
    assert capsys.readouterr().out == ""
    assert {p: os.stat(p).st_mtime_ns for p in again.data_path.iterdir()} == stored


def test_named_folders_are_datasets_of_their_own(tmp_path, capsys):
    pets, bugs, data = tmp_path / "pets", tmp_path / "bugs", tmp_path / "data"
    write_folder(pets, {"cat": RED, "dog": BLUE})
    write_folder(bugs, {"ant": RED, "bee": GREEN, "fly": BLUE})
    prepare("image_folder/pets-size32", str(data), str(pets))
    prepare("image_folder/bugs-size32", str(data), str(bugs))
    assert "rebuilding" not in capsys.readouterr().out
    assert read_all("image_folder/pets-size32", data)["test"] == ["cat", "dog"]
    assert read_all("image_folder/bugs-size32", data)["test"] == ["ant", "bee", "fly"]
    source = tfds.data_source("image_folder/pets-size32", split="train", data_dir=str(data))
    assert len(source) == 4 and source[0]["image"].shape == (32, 32, 3)
    builder = BUILDERS["image_folder"](config="bugs-size32", data_dir=str(data))
    assert builder.is_prepared() and builder.builder_config.image_size == 32


def test_named_config_with_a_size_not_offered(tmp_path):
    with pytest.raises(ValueError) as error:
        prepare("image_folder/pets-size7", str(tmp_path), str(tmp_path))
    assert str(error.value) == (
        "config='pets-size7' is unknown for image_folder; known: size224, size64, size32, "
        "<name>-size<N> with N one of 224, 64, 32"
    )


# ---- 3. bad files, junk and layouts, all checked before anything is written ----


def write_files(root, entries):
    """Each entry a relative path: "x/" a folder, an image suffix a tiny PNG, else junk bytes."""
    for index, entry in enumerate(entries):
        path = root / entry
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in common.IMAGE_SUFFIXES and not path.name.startswith("."):
            Image.new("RGB", (8, 8), (30 * index % 256, 80, 120)).save(path, format="PNG")
        else:
            path.write_bytes(b"junk")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(buffer, format="JPEG")
    return buffer.getvalue()[:-10]


BAD_IMAGES = {
    "cat/empty.jpg": (b"", "empty file (0 bytes)"),
    "cat/garbage.png": (b"these bytes are no image", "not an image file PIL can read"),
    "dog/link.png": (None, "a broken link: its target does not exist"),
    "dog/truncated.jpg": (truncated_jpeg(), None),  # PIL's own words, checked by pattern
}


def write_bad_images(root):
    for name, (content, _) in BAD_IMAGES.items():
        if content is None:
            (root / name).symlink_to(root / "nowhere.png")
        else:
            (root / name).write_bytes(content)


def test_unreadable_images_are_listed_one_per_line_and_nothing_is_written(tmp_path):
    root, data = tmp_path / "raw", tmp_path / "data"
    write_folder(root, {"cat": RED, "dog": BLUE})
    write_bad_images(root)
    with pytest.raises(ValueError) as error:
        prepare("image_folder/size32", str(data), str(root))
    header, *lines = str(error.value).splitlines()
    assert header == (
        f"image_folder: 4 unreadable image file(s) under {root}; fix or remove them, or pass "
        f"--skip_bad_files to leave them out:"
    )
    assert len(lines) == len(BAD_IMAGES)
    for line, (name, (_, reason)) in zip(lines, BAD_IMAGES.items()):
        if reason is None:
            assert re.fullmatch(
                re.escape(f"  {root / name}: cannot decode: ") + r"image file is truncated.*", line
            )
        else:
            assert line == f"  {root / name}: {reason}"
    assert not data.exists()


def test_a_changed_folder_with_bad_files_keeps_the_old_prepared_data(tmp_path):
    root, data = tmp_path / "raw", tmp_path / "data"
    write_folder(root, {"cat": RED, "dog": BLUE})
    builder = prepare("image_folder/size32", str(data), str(root))
    (root / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="1 unreadable image file"):
        prepare("image_folder/size32", str(data), str(root))
    assert builder.is_prepared() and not os.path.exists(f"{builder.data_dir}.previous")


def test_skip_bad_files_leaves_them_out_and_counts_them(tmp_path, capsys):
    root = tmp_path / "raw"
    write_folder(root, {"cat": RED, "dog": BLUE})
    write_bad_images(root)
    builder = prepare("image_folder/size32", str(tmp_path / "data"), str(root), skip_bad_files=True)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"image_folder: 6 images in 2 classes under {root} (train 4, test 2); ignored 0 junk or "
        f"non-image entries; skipped 4 unreadable image file(s) (skip_bad_files)"
    )
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "test": 2}


def test_junk_is_ignored_and_counted(tmp_path, capsys):
    root = tmp_path / "raw"
    junk = [".DS_Store", "__MACOSX/cat/._0.png", ".ipynb_checkpoints/0.png", "cat/._0.png",
            "cat/notes.txt", "dog/Thumbs.db"]  # fmt: skip
    write_files(root, ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"] + junk)
    (root / "dog" / "2.png").write_bytes((root / "dog" / "0.png").read_bytes())
    builder = prepare("image_folder/size32", str(tmp_path / "data"), str(root))
    assert capsys.readouterr().out.splitlines()[0] == (
        f"image_folder: 6 images in 2 classes under {root} (train 4, test 2); ignored 6 junk or "
        f"non-image entries; not images by suffix ({', '.join(common.IMAGE_SUFFIXES)}): "
        f"cat/notes.txt"
    )
    assert builder.info.features["label"].names == ["cat", "dog"]


def test_a_gif_is_prepared_as_predict_reads_it_and_other_files_are_named(tmp_path, capsys):
    """prepare reads a .gif (predict does) as its first frame, and names what it leaves out."""
    root = tmp_path / "raw"
    write_folder(root, {"cat": RED, "dog": BLUE}, count=2)
    Image.new("RGB", (8, 8), RED).save(root / "cat" / "2.gif")
    Image.new("RGB", (8, 8), BLUE).save(root / "dog" / "2.gif")
    for index in range(7):
        (root / "dog" / f"photo{index}.heic").write_bytes(b"not read")
    builder = prepare("image_folder/size32", str(tmp_path / "data"), str(root))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"image_folder: 6 images in 2 classes under {root} (train 4, test 2)")
    assert line.endswith(": dog/photo0.heic, dog/photo1.heic, dog/photo2.heic, dog/photo3.heic, "
                         "dog/photo4.heic and 2 more")  # fmt: skip
    # Each class reads back as its colour (a GIF's palette may move a level by one).
    labels = builder.info.features["label"]
    for split in ("train", "test"):
        for example in builder.as_data_source(split):
            colour = RED if labels.int2str(example["label"]) == "cat" else BLUE
            np.testing.assert_allclose(example["image"][0, 0], colour, atol=1)


# (entries under root, options, the error; {root} stands for the root folder)
LAYOUT_ERRORS = [
    pytest.param(["cat/0.png", "cat/1.png"], {},
                 "image_folder: one class folder ('cat') under {root}; a classifier needs two or "
                 "more (pass --allow_single_class to prepare it anyway)", id="single class"),
    pytest.param(["cat/0.png", "dog/", "eel/.DS_Store", "eel/notes.txt"], {},
                 "image_folder: class folders without images; add images, or pass "
                 "--allow_empty_classes to keep their classes without examples:\n"
                 "  {root}/dog\n  {root}/eel", id="empty class folders"),
    pytest.param(["cat/0.png", "dog/0.png", "dog/bad.png"], {"skip_bad_files": True},
                 "image_folder: class folders without readable images; add images, or pass "
                 "--allow_empty_classes to keep their classes without examples:\n  {root}/dog",
                 id="class emptied by skip_bad_files"),
    pytest.param(["cat/0.png", "dog/0.png", "stray.png"], {},
                 "image_folder: image files directly in {root} (1, first: stray.png); images "
                 "belong in class folders: {root}/<class>/<image>", id="image outside classes"),
    pytest.param(["train/cat/0.png", "train/dog/0.png", "train/x.jpg"], {},
                 "image_folder: image files directly in {root}/train (1, first: x.jpg); images "
                 "belong in class folders: {root}/train/<class>/<image>", id="image in split"),
    pytest.param(["train/cat/0.png", "train/dog/0.png", "cat/0.png"], {},
                 "image_folder: {root} holds split folders (train) and other folders (cat); use "
                 "one layout: {root}/<class>/ or {root}/<split>/<class>/", id="mixed layouts"),
    pytest.param(["train/cat/0.png", "val/cat/0.png", "validation/dog/0.png"], {},
                 "image_folder: {root} has both validation/ and val/; keep one of them",
                 id="val and validation"),
    pytest.param(["notes.txt", ".DS_Store"], {},
                 "image_folder: no class folders under {root}; expected {root}/<class>/<image> "
                 "or {root}/<split>/<class>/<image>", id="no class folders"),
]  # fmt: skip


@pytest.mark.parametrize("entries, options, expected", LAYOUT_ERRORS)
def test_layout_errors_name_the_folder(tmp_path, entries, options, expected):
    root, data = tmp_path / "raw", tmp_path / "data"
    write_files(root, entries)
    if "dog/bad.png" in entries:
        (root / "dog" / "bad.png").write_bytes(b"")
        (root / "dog" / "0.png").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        prepare("image_folder/size32", str(data), str(root), **options)
    assert str(error.value) == expected.format(root=root)
    assert not data.exists()


@pytest.mark.parametrize(
    "entries, options, names",
    [
        (["cat/0.png", "cat/1.png"], {"allow_single_class": True}, ["cat"]),
        (["cat/0.png", "cat/1.png", "dog/"], {"allow_empty_classes": True}, ["cat", "dog"]),
    ],
    ids=["allow_single_class", "allow_empty_classes"],
)
def test_single_or_empty_classes_when_asked_for(tmp_path, entries, options, names):
    write_files(tmp_path / "raw", entries)
    builder = prepare("image_folder/size32", str(tmp_path / "d"), str(tmp_path / "raw"), **options)
    assert builder.info.features["label"].names == names


def test_folder_options_are_refused_for_published_datasets(tmp_path):
    with pytest.raises(ValueError) as error:
        prepare("lfw_subset", str(tmp_path), skip_bad_files=True)
    assert str(error.value) == (
        "skip_bad_files=True: only image_folder checks a folder of your images; lfw_subset "
        "reads its files in their published layout"
    )


def test_cli_flags_reach_the_checks(tmp_path):
    root = tmp_path / "raw"
    write_files(root, ["cat/0.png", "cat/1.png"])
    (root / "cat" / "broken.jpg").write_bytes(b"")
    command = [
        sys.executable, "-m", "jaxmerge", "prepare", "--dataset=image_folder",
        "--config=mine-size32", f"--data_dir={tmp_path / 'data'}", f"--manual_dir={root}",
        "--skip_bad_files", "--allow_single_class",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped 1 unreadable image file(s) (skip_bad_files)" in done.stdout


# ---- 4. PEFT adapter folders: one line naming the file and what is wrong ----


def copy_adapter(tmp_path, name="a"):
    folder = tmp_path / name
    shutil.copytree(os.path.join(GOLDEN, "adapters", name), folder)
    return folder


JSON_OBJECT = "expected a JSON object of LoRA settings"
# (file, its new content from the old, the message after "PEFT adapter file '<path>': ")
MALFORMED_FILES = [
    pytest.param("adapter_config.json", lambda old: b'{\n  "peft_type": "LORA",\n  "r": 4',
                 "not valid JSON, truncated or corrupt (Expecting ',' delimiter at line 3 "
                 f"column 9); {JSON_OBJECT}", id="truncated config"),
    pytest.param("adapter_config.json", lambda old: b"", f"empty; {JSON_OBJECT}",
                 id="empty config"),
    pytest.param("adapter_config.json", lambda old: b'["q_proj", "v_proj"]',
                 f"holds a list; {JSON_OBJECT}", id="config is a list"),
    pytest.param("adapter_config.json", lambda old: b"\xff\xfe\x00garbage",
                 f"not UTF-8 text; {JSON_OBJECT}", id="binary config"),
    pytest.param("adapter_model.safetensors", lambda old: b"", "empty; expected safetensors "
                 "tensors", id="empty weights"),
    pytest.param("adapter_model.safetensors", lambda old: b"these bytes hold no tensors",
                 "not a readable safetensors file, truncated or corrupt (header too large)",
                 id="garbage weights"),
    pytest.param("adapter_model.safetensors", lambda old: old[:-10],
                 "not a readable safetensors file, truncated or corrupt (incomplete metadata, "
                 "file not fully covered)", id="truncated weights"),
]  # fmt: skip


@pytest.mark.parametrize("file_name, corrupt, problem", MALFORMED_FILES)
def test_malformed_adapter_files_are_named_in_one_line(tmp_path, file_name, corrupt, problem):
    folder = copy_adapter(tmp_path)
    path = folder / file_name
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError) as error:
        peft_io.load_peft_adapter(str(folder))
    assert str(error.value) == f"PEFT adapter file {str(path)!r}: {problem}"


# (config changes to adapter "a": LoRA on q_proj and v_proj of layers 0 and 1, r=4, alpha=8;
# the message after "PEFT adapter '<folder>': ")
WEIGHTS_SAY = "in adapter_model.safetensors (its modules end in q_proj, v_proj)"
CONFIG_DISAGREES = [
    pytest.param({"target_modules": ["q_proj", "v_proj", "fc1"]},
                 f"target_modules entry 'fc1' matches no LoRA module {WEIGHTS_SAY}",
                 id="target_modules names an absent module"),
    pytest.param({"target_modules": ["q_proj"]},
                 "adapter_model.safetensors holds LoRA factors for 'layers.0.attention.v_proj', "
                 "which target_modules=['q_proj'] does not name; PEFT would not load them",
                 id="weights for a module not targeted"),
    pytest.param({"target_modules": r".*\.q_proj"},
                 "adapter_model.safetensors holds LoRA factors for 'layers.0.attention.v_proj', "
                 "which target_modules='.*\\\\.q_proj' does not name; PEFT would not load them",
                 id="regex target_modules"),
    pytest.param({"rank_pattern": {"k_proj": 2}},
                 f"rank_pattern key 'k_proj' matches no LoRA module {WEIGHTS_SAY}",
                 id="rank_pattern names an absent module"),
    pytest.param({"alpha_pattern": {"fc2": 3}},
                 f"alpha_pattern key 'fc2' matches no LoRA module {WEIGHTS_SAY}",
                 id="alpha_pattern names an absent module"),
    pytest.param({"lora_alpha": float("nan")}, "lora_alpha=nan; allowed: a finite number",
                 id="NaN lora_alpha"),
    pytest.param({"lora_alpha": float("inf")}, "lora_alpha=inf; allowed: a finite number",
                 id="inf lora_alpha"),
    pytest.param({"r": 0}, "r=0; allowed: a positive integer", id="zero r"),
    pytest.param({"rank_pattern": {"q_proj": 2.5}},
                 "rank_pattern['q_proj']=2.5; allowed: a positive integer", id="fractional rank"),
    pytest.param({"alpha_pattern": {"q_proj": float("-inf")}},
                 "alpha_pattern['q_proj']=-inf; allowed: a finite number", id="inf alpha_pattern"),
]  # fmt: skip


@pytest.mark.parametrize("changes, problem", CONFIG_DISAGREES)
def test_config_that_disagrees_with_its_weights(tmp_path, changes, problem):
    folder = copy_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError) as error:
        peft_io.load_peft_adapter(str(folder))
    assert str(error.value) == f"PEFT adapter {str(folder)!r}: {problem}"


@pytest.mark.parametrize(
    "adapter, tensor, module",
    [
        ("a", "base_model.model.layers.1.attention.v_proj.lora_B.weight",
         "layers.1.attention.v_proj"),
        ("cls", "base_model.model.classifier.bias", "classifier"),
    ],
    ids=["LoRA factor", "classifier"],
)  # fmt: skip
def test_non_finite_weights_name_their_module(tmp_path, adapter, tensor, module):
    from safetensors.numpy import load_file, save_file

    folder = copy_adapter(tmp_path, adapter)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[tensor].flat[:2] = [np.nan, np.inf]
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as error:
        peft_io.load_peft_adapter(str(folder))
    assert str(error.value) == (
        f"PEFT adapter file {str(path)!r}: module {module!r} has 2 NaN or infinite values in "
        f"tensor {tensor!r}"
    )


@pytest.mark.parametrize(
    "folder",
    sorted(
        os.path.join(kind, name)
        for kind in ("adapters", "adapters_v4", "exported")
        for name in os.listdir(os.path.join(GOLDEN, kind))
    ),
)
def test_adapters_written_by_peft_pass_every_check(folder):
    adapter, _, _ = peft_io.load_peft_adapter(os.path.join(GOLDEN, folder))
    assert adapter
