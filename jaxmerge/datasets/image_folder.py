"""Bring your own data: image classification from one subfolder per class.

Layout, with manual_dir as the root (either form):

    root/<class>/*.{jpg,png,...}                  one split, cut 80 / 20 into train / test
                                                  within each class, seed 0
    root/{train,validation|val,test}/<class>/*    the given splits (any subset of the three)

Classes are the sorted union of the class folder names over all splits. The class names are
only known once the root is read, so they are set on the `label` feature while preparing and
restored from the prepared dataset when reading.

Names: each folder of yours can be a dataset of its own, under a config named
`<name>-size<N>` (N one of 224, 64, 32), e.g.

    python -m jaxmerge prepare --dataset image_folder --config pets-size64 \
        --manual_dir ~/pets --data_dir ~/tensorflow_datasets
    tfds.data_source("image_folder/pets-size64", split="train", data_dir=...)

Every TFDS config is its own folder (data_dir/image_folder/pets-size64/1.0.0), so two names
never share files; TFDS reads a config its code does not list from the prepared files, and
`ImageFolder(config="pets-size64")` builds it from the name. The plain `size<N>` configs are
one unnamed dataset.

Source: the prepared dataset records the folder it was made from and a fingerprint of its
images (sorted relative paths, sizes and mtimes, hashed) in `builder.info.metadata["source"]`;
`prepare.prepare` rebuilds it when the folder or its files differ.

Images: decoded in any mode PIL reads (`common.to_rgb`), turned upright by their EXIF
orientation; 16-bit grey and RGB are scaled to 8 bits (65535 -> 255, 32768 -> 128), CMYK and
palettes converted, and transparent pixels (RGBA, LA, palettes or colour keys with
transparency) blended onto a white background (`common.BACKGROUND`). Each image is then
centre-cropped to a square and resized to the config's `image_size` (`common.file_image`,
which `python -m jaxmerge predict` applies to your files too).

Checks (`scan`, before anything is written): every unreadable image (empty, truncated, not an
image) is an error, one line per path, unless skip_bad_files leaves them out; junk (names
starting with ".", which covers .DS_Store and ._* AppleDouble files, Thumbs.db, desktop.ini,
__MACOSX) and files without an image suffix are ignored and counted; images outside class
folders, split folders mixed with class folders, a class folder without images (unless
allow_empty_classes) and a single class (unless allow_single_class) are errors naming the
folder.

Features: `image` uint8 (S, S, 3), `label` ClassLabel over the class folder names.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import tensorflow_datasets as tfds

from jaxmerge.datasets import common, folder_check

SPLIT_SEED = 0
FRACTIONS = {"train": 0.8, "test": 0.2}
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
NAMED_CONFIG = re.compile(r"(?P<name>[\w-]+)-size(?P<size>\d+)")
NAMED_CONFIG_HELP = f"<name>-size<N> with N one of {', '.join(map(str, common.PHOTO_SIZES))}"


def named_config(config_name: str) -> common.SizeConfig | None:
    """The config of a dataset named by the user, `<name>-size<N>`; None for other names."""
    match = NAMED_CONFIG.fullmatch(config_name)
    if match is None or int(match["size"]) not in common.PHOTO_SIZES:
        return None
    size = int(match["size"])
    return common.SizeConfig(
        name=config_name,
        image_size=size,
        description=f"{match['name']}: images resized to {size}x{size}",
    )


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """A checked root: its images per split and class, and what was left out."""

    root: pathlib.Path
    files: dict[str, dict[str, list[pathlib.Path]]]  # split -> class name -> image paths
    class_names: list[str]
    ignored: int  # junk and non-image entries
    non_images: list[str]  # of those, the files that are not junk (named in the summary)
    skipped: list[str]  # "path: problem" of unreadable images left out (skip_bad_files)
    fingerprint: str

    @property
    def num_images(self) -> int:
        return sum(len(paths) for classes in self.files.values() for paths in classes.values())

    def summary(self) -> str:
        """One line: images per split, classes, and what was ignored or skipped."""
        per_split = ", ".join(
            f"{split} {sum(map(len, classes.values()))}" for split, classes in self.files.items()
        )
        line = (
            f"image_folder: {self.num_images} images in {len(self.class_names)} classes under "
            f"{self.root} ({per_split}); ignored {self.ignored} junk or non-image entries"
        )
        if self.non_images:
            names = ", ".join(self.non_images[:5])
            more = f" and {len(self.non_images) - 5} more" if len(self.non_images) > 5 else ""
            line += f"; not images by suffix ({', '.join(common.IMAGE_SUFFIXES)}): {names}{more}"
        if self.skipped:
            line += f"; skipped {len(self.skipped)} unreadable image file(s) (skip_bad_files)"
        return line

    def source_record(self) -> dict:
        """What the prepared dataset stores about its source (JSON-serialisable)."""
        return {
            "manual_dir": str(self.root),
            "fingerprint": self.fingerprint,
            "images": self.num_images,
        }


def _raise_for_loose_images(folder: pathlib.Path, images: list[pathlib.Path]) -> None:
    if images:
        raise ValueError(
            f"image_folder: image files directly in {folder} ({len(images)}, first: "
            f"{images[0].name}); images belong in class folders: {folder}/<class>/<image>"
        )


def find_class_folders(root: pathlib.Path) -> tuple[dict[str | None, dict], int]:
    """{split (None: one to cut 80 / 20): {class name: folder}} and the entries ignored."""
    top = folder_check.list_folder(root)
    _raise_for_loose_images(root, top.images)
    split_folders = [f for f in top.folders if f.name in SPLIT_FOLDERS]
    if not split_folders:
        return {None: {f.name: f for f in top.folders}}, top.ignored
    others = [f.name for f in top.folders if f.name not in SPLIT_FOLDERS]
    if others:
        raise ValueError(
            f"image_folder: {root} holds split folders ({', '.join(f.name for f in split_folders)})"
            f" and other folders ({', '.join(others)}); use one layout: {root}/<class>/ or "
            f"{root}/<split>/<class>/"
        )
    by_split: dict[str | None, dict] = {}
    ignored = top.ignored
    for folder in split_folders:
        split = SPLIT_FOLDERS[folder.name]
        if split in by_split:
            raise ValueError(
                f"image_folder: {root} has both validation/ and val/; keep one of them"
            )
        listing = folder_check.list_folder(folder)
        _raise_for_loose_images(folder, listing.images)
        by_split[split] = {f.name: f for f in listing.folders}
        ignored += listing.ignored
    return by_split, ignored


def _raise_for_empty_classes(folders, images, allowed: bool, why: str) -> None:
    empty = [folders[key] for key, paths in images.items() if not paths]
    if empty and not allowed:
        lines = "".join(f"\n  {folder}" for folder in empty)
        raise ValueError(
            f"image_folder: class folders without {why}; add images, or pass "
            f"--allow_empty_classes to keep their classes without examples:{lines}"
        )


def _assign_splits(images: dict[tuple, list[pathlib.Path]]) -> dict[str, dict[str, list]]:
    """{split: {class: paths}}: the given splits, or each class cut 80 / 20 by file name."""
    out: dict[str, dict[str, list]] = {}
    if all(split is not None for split, _ in images):
        for (split, name), paths in sorted(images.items()):
            out.setdefault(split, {})[name] = paths
        return {split: classes for split, classes in out.items() if any(classes.values())}
    out = {split: {} for split in FRACTIONS}
    for class_index, ((_, name), paths) in enumerate(sorted(images.items())):
        by_name = {p.name: p for p in paths}
        chosen = common.split_items(list(by_name), FRACTIONS, SPLIT_SEED + class_index)
        for split, file_names in chosen.items():
            out[split][name] = [by_name[f] for f in sorted(file_names)]
    # TFDS cannot write a split without examples (a few images per class cut 80 / 20 leave
    # none for test); such a split is left out, and the scan's summary lists the splits.
    return {split: classes for split, classes in out.items() if any(classes.values())}


def scan(
    manual_dir,
    *,
    skip_bad_files: bool = False,
    allow_single_class: bool = False,
    allow_empty_classes: bool = False,
) -> FolderScan:
    """Lists and checks a root in either layout; decodes every image once to find bad ones.

    Raises:
      ValueError: one line per problem, naming the folder or file: no class folders, a single
        class, images outside class folders, mixed layouts, class folders without images,
        unreadable images (without skip_bad_files).
    """
    root = pathlib.Path(manual_dir).expanduser().resolve()
    class_folders, ignored = find_class_folders(root)
    folders, images = {}, {}
    for split, classes in class_folders.items():
        for name, folder in classes.items():
            listing = folder_check.list_folder(folder)
            folders[split, name], images[split, name] = folder, listing.images
            ignored += listing.ignored + len(listing.folders)  # nested folders are not read
    class_names = sorted({name for _, name in images})
    if not class_names:
        raise ValueError(
            f"image_folder: no class folders under {root}; expected {root}/<class>/<image> or "
            f"{root}/<split>/<class>/<image>"
        )
    if len(class_names) == 1 and not allow_single_class:
        raise ValueError(
            f"image_folder: one class folder ({class_names[0]!r}) under {root}; a classifier "
            f"needs two or more (pass --allow_single_class to prepare it anyway)"
        )
    _raise_for_empty_classes(folders, images, allow_empty_classes, "images")
    bad = {}
    for paths in images.values():
        for path in paths:
            if (problem := folder_check.read_problem(path)) is not None:
                bad[path] = f"{path}: {problem}"
    if bad and not skip_bad_files:
        lines = "".join(f"\n  {line}" for line in bad.values())
        raise ValueError(
            f"image_folder: {len(bad)} unreadable image file(s) under {root}; fix or remove "
            f"them, or pass --skip_bad_files to leave them out:{lines}"
        )
    images = {key: [p for p in paths if p not in bad] for key, paths in images.items()}
    _raise_for_empty_classes(folders, images, allow_empty_classes, "readable images")
    return FolderScan(
        root=root,
        files=_assign_splits(images),
        class_names=class_names,
        ignored=ignored,
        non_images=folder_check.non_images(root),
        skipped=list(bad.values()),
        fingerprint=folder_check.fingerprint(root),
    )


@common.register
class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """Classification over class-named folders of images under manual_dir."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = common.size_configs(*common.PHOTO_SIZES)
    NAMED_CONFIG_HELP = NAMED_CONFIG_HELP
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Pass the root of your images as manual_dir: root/<class>/* or root/train/<class>/*,
    root/test/<class>/* (and optionally root/validation/ or root/val/).
    """

    def __init__(self, *, folder_scan: FolderScan | None = None, **kwargs):
        # `prepare` passes the scan it has checked, so each image is decoded once to check it
        # and once to store it; without one, `_split_generators` scans manual_dir itself.
        self._scan = folder_scan
        super().__init__(**kwargs)

    @classmethod
    def get_builder_config(cls, name, version=None):
        """The `size<N>` configs, or a dataset of the user's own name, `<name>-size<N>`."""
        return super().get_builder_config(name, version) or named_config(name)

    @staticmethod
    def scan_source(manual_dir, **options) -> FolderScan:
        """`scan`: checks manual_dir before anything is prepared from it."""
        return scan(manual_dir, **options)

    def source_change(self, manual_dir) -> str | None:
        """How this prepared dataset's recorded source differs from manual_dir (None: same)."""
        recorded = (self.info.metadata or {}).get("source")
        if not recorded:
            return "has no record of the folder it was prepared from"
        root = pathlib.Path(manual_dir).expanduser().resolve()
        if recorded["manual_dir"] != str(root):
            return f"was prepared from {recorded['manual_dir']}, not {root}"
        if recorded["fingerprint"] != folder_check.fingerprint(root):
            return f"was prepared before images under {root} were added, removed or changed"
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            None,
            metadata=tfds.core.MetadataDict(),
            image=common.image_feature(self.builder_config.image_size, 3, "jpeg"),
            label=tfds.features.ClassLabel(),
        )

    def _split_generators(self, dl_manager):
        found = self._scan or scan(dl_manager.manual_dir)
        self.info.features["label"].names = found.class_names
        self.info.metadata["source"] = found.source_record()
        return {split: self._generate_examples(classes) for split, classes in found.files.items()}

    def _generate_examples(self, classes):
        size = self.builder_config.image_size
        label_of = self.info.features["label"].str2int
        for class_name, paths in sorted(classes.items()):
            for path in paths:
                yield (
                    f"{class_name}/{path.name}",
                    {
                        "image": common.encode(common.file_image(path, size), "jpeg"),
                        "label": label_of(class_name),
                    },
                )
