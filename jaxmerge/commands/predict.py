"""Run every task of a model on image files: one row of readable predictions per image.

    python -m jaxmerge predict --model models/digits_box photos/ 'scans/**/*.png' \
        --output predictions.jsonl
    python -m jaxmerge predict --model W/adapters/digits one.png --output predictions.csv

`--model` is a model folder (`python -m jaxmerge merge`) or one training run
(WORKDIR/adapters/<task>, its adapter folded into its base). Paths are image files, folders
(searched recursively for image suffixes, hidden files such as .DS_Store skipped) or globs.
Images of any size and PIL mode (grey, RGBA, CMYK, 16-bit, ...) are decoded to RGB, turned
upright by their EXIF orientation, and prepared exactly as `prepare` and training prepared each
task's images (`jaxmerge.image_input`: the centre square, resized, as the task's dataset stores
it). Rows go to `--output` as JSONL or CSV (by suffix), or as JSONL to stdout: the path, then
per task the class name and probability, the value, or the landmarks in pixels of the image as
a viewer shows it (upright, before the crop: `x = left + u * side` of the centre square). An
image that cannot be read (or has more than `datasets.common.MAX_PIXELS` pixels) gives one line
on stderr and a row with an "error" field; the others go on. The exit status is 1 when no image
was predicted.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import prediction


def define_flags():
    flags.DEFINE_string("model", None, "A model folder, or a run folder WORKDIR/adapters/<task>.")
    flags.DEFINE_string("output", None, "Rows as .jsonl or .csv (default: JSONL on stdout).")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
    flags.DEFINE_multi_string("run", [], "With --requests: a LoRA run folder; repeated.")
    flags.DEFINE_string(
        "requests", None, "A .csv (columns path, task) or .jsonl file: each image for one task."
    )


def main(argv):
    args = flags.FLAGS
    if args.requests is not None:
        if args.model is not None or argv[1:]:
            raise ValueError("--requests: takes --run folders, not --model or PATHS")
        status = prediction.predict_request_file(
            args.run, args.requests, args.output, args.batch_size
        )
    elif args.model is None:
        raise ValueError("--model: give a model or run folder (or --requests with --run)")
    else:
        if args.run:
            raise ValueError("--run: only with --requests; for one model give --model")
        status = prediction.predict_files(args.model, argv[1:], args.output, args.batch_size)
    if status:
        sys.exit(status)


def cli():
    cli_lib.run(main, define_flags)


if __name__ == "__main__":
    cli()
