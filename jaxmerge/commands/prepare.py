"""Prepare any of jaxmerge's dataset builders as array_record, ready for `tfds.data_source`.

    python -m jaxmerge prepare --dataset utkface --data_dir ~/tensorflow_datasets \
        --manual_dir ~/downloads/utkface [--config size64]

The paper's datasets (and `image_folder`) are read from files downloaded by hand into
`--manual_dir`; the offline ones (sklearn_digits, fashion_mnist_idx, skimage_textures,
lfw_subset) need none. Your own folders (`image_folder`) are checked before anything is
written: unreadable images stop the run, one line per file, unless --skip_bad_files; a single
class or an empty class folder stops it unless --allow_single_class / --allow_empty_classes.
Give each folder a name of its own with `--config <name>-size<N>`. The work, and what happens
when a prepared folder changed: `jaxmerge.datasets.prepare`.
"""

from __future__ import annotations

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge.datasets import BUILDERS, prepare


def define_flags():
    flags.DEFINE_string("dataset", None, f"One of: {', '.join(BUILDERS)}.")
    flags.DEFINE_string("data_dir", None, "TFDS data folder to write into.")
    flags.DEFINE_string("manual_dir", None, "Folder of hand-downloaded files.")
    flags.DEFINE_string(
        "config", None, "Builder config, e.g. size64; image_folder: <name>-size64 names it."
    )
    flags.DEFINE_integer("max_examples_per_split", None, "Keep the first N of each split.")
    flags.DEFINE_bool("skip_bad_files", False, "image_folder: leave unreadable images out.")
    flags.DEFINE_bool("allow_single_class", False, "image_folder: accept one class folder.")
    flags.DEFINE_bool("allow_empty_classes", False, "image_folder: accept empty class folders.")


def main(argv):
    del argv
    args = flags.FLAGS
    name = f"{args.dataset}/{args.config}" if args.config else args.dataset
    builder = prepare.prepare(
        name,
        args.data_dir,
        args.manual_dir,
        args.max_examples_per_split,
        skip_bad_files=args.skip_bad_files,
        allow_single_class=args.allow_single_class,
        allow_empty_classes=args.allow_empty_classes,
    )
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"prepared {builder.info.full_name} in {args.data_dir}: {splits}")


def cli():
    cli_lib.run(main, define_flags, required=["dataset", "data_dir"])


if __name__ == "__main__":
    cli()
