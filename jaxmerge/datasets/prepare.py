"""Prepares any jaxmerge dataset builder as array_record, ready for `tfds.data_source`.

    python -m jaxmerge.datasets.prepare --dataset utkface --data_dir ~/tensorflow_datasets \
        --manual_dir ~/downloads/utkface [--config size64]

The paper's datasets (and `image_folder`) are read from files downloaded by hand into
manual_dir; the offline ones (sklearn_digits, fashion_mnist_idx, skimage_textures, lfw_subset)
need no manual_dir. Afterwards read a split with
`input_pipeline.open_source(name, split, data_dir)`.
"""

from __future__ import annotations

import argparse
import os
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(BUILDERS)}")
    parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
    parser.add_argument("--manual_dir", default=None, help="folder of hand-downloaded files")
    parser.add_argument("--config", default=None, help="builder config, e.g. size64")
    parser.add_argument("--max_examples_per_split", type=int, default=None)
    args = parser.parse_args(argv)
    name = f"{args.dataset}/{args.config}" if args.config else args.dataset
    try:
        builder = prepare(name, args.data_dir, args.manual_dir, args.max_examples_per_split)
    except ValueError as e:
        raise SystemExit(f"prepare: error: {e}") from None
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"prepared {builder.info.full_name} in {args.data_dir}: {splits}")


if __name__ == "__main__":
    main(sys.argv[1:])
