"""Preparing any of jaxmerge's dataset builders as array_record, ready for `tfds.data_source`.

`prepare(name, data_dir, manual_dir)` does it (`python -m jaxmerge prepare` is the command over
it). The paper's datasets (and `image_folder`) are read from files downloaded by hand into
manual_dir; the offline ones (sklearn_digits, fashion_mnist_idx, skimage_textures, lfw_subset)
need no manual_dir. Afterwards read a split with
`jaxmerge.input_pipeline.sources.open_source(name, split, data_dir)`.

Your own folders (`image_folder`, see its module docstring) are checked before anything is
written: unreadable images stop the run, one line per file, unless --skip_bad_files; a single
class or an empty class folder stops it unless --allow_single_class / --allow_empty_classes.
Give each folder a name of its own with `--config <name>-size<N>`. A prepared folder dataset
is rebuilt when its folder or the images in it changed, saying so in one line; the old
prepared data is kept beside it as `<version>.previous` (one copy, replaced each time).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys

import tensorflow_datasets as tfds

from jaxmerge.datasets import BUILDERS


def check_request(name: str, manual_dir: str | None) -> tuple[str, str | None]:
    """Validates a dataset name ("utkface" or "utkface/size64") and its manual_dir.

    Returns:
      (builder name, config name or None).

    Raises:
      ValueError: unknown dataset or config, or a manual dataset without an existing manual_dir.
    """
    builder_name, _, config_name = name.partition("/")
    if builder_name not in BUILDERS:
        raise ValueError(f"dataset={builder_name!r} is unknown; known: {', '.join(BUILDERS)}")
    cls = BUILDERS[builder_name]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if hasattr(cls, "NAMED_CONFIG_HELP"):
        configs.append(cls.NAMED_CONFIG_HELP)
    if config_name and cls.get_builder_config(config_name) is None:
        raise ValueError(
            f"config={config_name!r} is unknown for {builder_name}; known: {', '.join(configs)}"
        )
    if cls.MANUAL_DOWNLOAD_INSTRUCTIONS:
        how = " ".join(cls.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        if manual_dir is None:
            raise ValueError(f"dataset {builder_name} needs manual_dir: {how}")
        if not os.path.isdir(manual_dir):
            raise ValueError(f"manual_dir={manual_dir!r} for {builder_name} is not a folder: {how}")
    return builder_name, config_name or None


def keep_previous(version_dir: str) -> str:
    """Moves a prepared version folder to `<version_dir>.previous` (replacing an older one).

    TFDS only reads folders named like versions, so the moved copy is invisible to it.
    """
    previous = f"{version_dir}.previous"
    if os.path.isdir(previous):
        shutil.rmtree(previous)
    os.rename(version_dir, previous)
    return previous


def prepare(
    name: str,
    data_dir: str,
    manual_dir: str | None = None,
    max_examples_per_split: int | None = None,
    *,
    skip_bad_files: bool = False,
    allow_single_class: bool = False,
    allow_empty_classes: bool = False,
) -> tfds.core.DatasetBuilder:
    """Prepares dataset `name` ("builder" or "builder/config") in data_dir as array_record.

    A builder over a folder of your images (one with `scan_source`, i.e. `image_folder`) is
    checked first and nothing is written if a check fails; when it is already prepared from
    another folder, or from files since added, removed or changed, it is rebuilt (one line
    says so) and the old data kept in `<version folder>.previous`.

    Args:
      name: a key of `BUILDERS`, optionally with "/config".
      data_dir: the TFDS data folder to write into (and later read from).
      manual_dir: the folder holding hand-downloaded files, for builders that need one.
      max_examples_per_split: keep only the first N examples of each split (for smoke runs).
      skip_bad_files: leave unreadable images out (counted) instead of stopping.
      allow_single_class: prepare a folder with one class folder.
      allow_empty_classes: keep class folders without images as classes without examples.

    Returns:
      The prepared builder (`builder.as_data_source(split)` reads it).

    Raises:
      ValueError: an unknown name, a missing manual_dir, a folder option for a builder that
        reads published files, or a failed folder check (every bad file on its own line).
    """
    builder_name, config_name = check_request(name, manual_dir)
    cls = BUILDERS[builder_name]
    folder_options = {
        "skip_bad_files": skip_bad_files,
        "allow_single_class": allow_single_class,
        "allow_empty_classes": allow_empty_classes,
    }
    reads_a_folder = hasattr(cls, "scan_source")
    used = [option for option, value in folder_options.items() if value]
    if used and not reads_a_folder:
        raise ValueError(
            f"{used[0]}=True: only image_folder checks a folder of your images; "
            f"{builder_name} reads its files in their published layout"
        )
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, max_examples_per_split=max_examples_per_split
    )
    if reads_a_folder:
        builder = _checked_folder_builder(cls, config_name, data_dir, manual_dir, folder_options)
    else:
        builder = cls(config=config_name, data_dir=data_dir)
    with _quiet_tfds():
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return builder


@contextlib.contextmanager
def _quiet_tfds():
    """Without TFDS's own stdout lines ("Dataset ... downloaded and prepared to ...": nothing is
    downloaded, and callers print what was prepared), and without its progress bars when
    stderr is not a terminal (a log file would get every redraw)."""
    tfds.display_progress_bar(sys.stderr.isatty())
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(True)


def _checked_folder_builder(cls, config_name, data_dir: str, manual_dir: str, folder_options):
    """The builder to prepare a user's folder with: the prepared one if its source is
    unchanged, else one holding the folder's checked scan (the old data moved aside)."""
    builder = cls(config=config_name, data_dir=data_dir)
    # (is_prepared logs a warning for a folder that does not exist yet)
    prepared = os.path.isdir(builder.data_dir) and builder.is_prepared()
    change = builder.source_change(manual_dir) if prepared else None
    if prepared and change is None:
        return builder  # prepared from this folder as it is now: download_and_prepare skips
    folder_scan = cls.scan_source(manual_dir, **folder_options)  # raises before writing
    print(folder_scan.summary())
    if change is not None:
        previous = keep_previous(builder.data_dir)
        print(f"{builder.info.full_name} {change}; rebuilding it (the old data is in {previous})")
    return cls(config=config_name, data_dir=data_dir, folder_scan=folder_scan)
