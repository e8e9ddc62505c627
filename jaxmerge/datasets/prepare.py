"""Prepares any jaxmerge dataset builder as array_record, ready for `tfds.data_source`.

    python -m jaxmerge.datasets.prepare --dataset utkface --data_dir ~/tensorflow_datasets \
        --manual_dir ~/downloads/utkface [--config size64]

The paper's datasets (and `image_folder`) are read from files downloaded by hand into
manual_dir; the offline ones (sklearn_digits, fashion_mnist_idx, skimage_textures, lfw_subset)
need no manual_dir. Afterwards read a split with
`jaxmerge.data.sources.open_source(name, split, data_dir)`.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import flags

from jaxmerge import cli as cli_lib
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
    if config_name and config_name not in configs:
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


def prepare(
    name: str,
    data_dir: str,
    manual_dir: str | None = None,
    max_examples_per_split: int | None = None,
) -> tfds.core.DatasetBuilder:
    """Prepares dataset `name` ("builder" or "builder/config") in data_dir as array_record.

    Args:
      name: a key of `BUILDERS`, optionally with "/config".
      data_dir: the TFDS data folder to write into (and later read from).
      manual_dir: the folder holding hand-downloaded files, for builders that need one.
      max_examples_per_split: keep only the first N examples of each split (for smoke runs).

    Returns:
      The prepared builder (`builder.as_data_source(split)` reads it).
    """
    builder_name, config_name = check_request(name, manual_dir)
    builder = BUILDERS[builder_name](config=config_name, data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, max_examples_per_split=max_examples_per_split
        ),
    )
    return builder


def define_flags():
    flags.DEFINE_string("dataset", None, f"One of: {', '.join(BUILDERS)}.")
    flags.DEFINE_string("data_dir", None, "TFDS data folder to write into.")
    flags.DEFINE_string("manual_dir", None, "Folder of hand-downloaded files.")
    flags.DEFINE_string("config", None, "Builder config, e.g. size64.")
    flags.DEFINE_integer("max_examples_per_split", None, "Keep the first N of each split.")


def main(argv):
    del argv
    args = flags.FLAGS
    name = f"{args.dataset}/{args.config}" if args.config else args.dataset
    builder = prepare(name, args.data_dir, args.manual_dir, args.max_examples_per_split)
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"prepared {builder.info.full_name} in {args.data_dir}: {splits}")


def cli():
    cli_lib.run(main, define_flags, required=["dataset", "data_dir"])


if __name__ == "__main__":
    cli()
