"""Run every task of a model on image files: one row of readable predictions per image.

    python -m jaxmerge.predict --model models/digits_box photos/ 'scans/**/*.png' \
        --output predictions.jsonl
    python -m jaxmerge.predict --model W/adapters/digits one.png --output predictions.csv

`--model` is a model folder (`python -m jaxmerge.merge`) or one training run
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

import contextlib
import csv
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import flags

from jaxmerge import cli as cli_lib
from jaxmerge import heads, image_input, logs, mixed_requests, model_folder
from jaxmerge.datasets import common, folder_check


def open_model(path: str) -> model_folder.MultiTaskModel:
    """A model folder (it has model.json) or a training run folder (it has checkpoints/)."""
    if os.path.isfile(os.path.join(path, model_folder.MODEL_FILE)):
        return model_folder.load(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return model_folder.from_run(path)
    if not os.path.exists(path):
        raise ValueError(f"--model: {path!r} does not exist")
    raise ValueError(
        f"--model: {path!r} holds neither {model_folder.MODEL_FILE} nor checkpoints/; allowed: "
        f"a folder written by `python -m jaxmerge.merge` or a run folder WORKDIR/adapters/<task>"
    )


def _images_in(folder: str) -> list[str]:
    """Image files under `folder` (recursive), in sorted order: the files prepare would read
    (`folder_check`'s suffixes, junk such as .DS_Store, macOS `._name.jpg` and .git skipped)."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not folder_check.is_junk(f))
        found += [
            os.path.join(root, name)
            for name in sorted(files)
            if not folder_check.is_junk(name) and folder_check.is_image_name(name)
        ]
    return found


def image_paths(patterns: Sequence[str]) -> list[str]:
    """Files, folders and globs -> image files, each once, in the order given.

    A file named explicitly is kept whatever its suffix; folders (also those a glob matches)
    are searched with `_images_in`.
    """
    paths: list[str] = []
    for pattern in patterns:
        matches = (
            [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
        )
        if not matches:
            raise ValueError(
                f"PATHS: {pattern!r} is not a file, a folder or a glob that matches anything"
            )
        for match in matches:
            paths += _images_in(match) if os.path.isdir(match) else [match]
    unique = list(dict.fromkeys(paths))
    if not unique:
        suffixes = ", ".join(common.IMAGE_SUFFIXES)
        raise ValueError(f"PATHS: no image files ({suffixes}) in {patterns}")
    return unique


def predict_paths(
    model: model_folder.MultiTaskModel, paths: Sequence[str], batch_size: int = 32
) -> Iterator[dict[str, Any]]:
    """One row per path, in order: {"path", task: prediction, ...} or {"path", "error"}.

    Each file is read upright (its EXIF orientation applied) and prepared as prepare and
    training prepared its task's images (`MultiTaskModel.predict_images`). A file that cannot
    be decoded gives one line on stderr naming it and the cause. Batches are padded to
    `batch_size`, so the model compiles once.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size: got {batch_size}; allowed: an integer >= 1")
    bar = logs.progress(total=len(paths), desc="predict", unit="img")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        rows: list[dict[str, Any]] = [{"path": p} for p in chunk]
        images, good = [], []
        for index, path in enumerate(chunk):
            rgb, error = image_input.read_upright(path)
            if error is not None:
                rows[index]["error"] = error
                continue
            images.append(rgb)
            good.append(index)
        if images:
            for index, prediction in zip(good, model.predict_images(images, batch_size)):
                rows[index].update(prediction)
        bar.update(len(chunk))
        yield from rows
    bar.close()


def csv_columns(tasks: Mapping[str, Mapping[str, Any]], requests: bool = False) -> list[str]:
    """path (and, for `--requests`, the request's task), then per task its head kind's fields
    (`HeadKind.columns`: `task.label`, `task.probability` / `task.value` / `task.x0`, `task.y0`,
    ...), then error."""
    columns = ["path", "task"] if requests else ["path"]
    for task, info in tasks.items():
        columns += [f"{task}.{c}" for c in heads.head_kind(info["kind"]).columns(info)]
    return columns + ["error"]


def flat_row(row: Mapping[str, Any], tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A row as `csv_columns` names its fields (`HeadKind.flatten`); a row with an error
    has only its path and the error."""
    flat = {"path": row["path"], "error": row.get("error", "")}
    if "task" in row:  # a request's task (`--requests`)
        flat["task"] = row["task"]
    for task, info in tasks.items():
        if task in row:
            fields = heads.head_kind(info["kind"]).flatten(row[task])
            flat.update({f"{task}.{name}": value for name, value in fields.items()})
    return flat


def write_rows(rows: Iterable[dict], output: str | None, tasks, requests: bool = False) -> int:
    """Writes rows as they come (JSONL, or CSV for a `.csv` output; stdout without one);
    returns how many were written."""
    count = 0
    with contextlib.ExitStack() as stack:
        out = sys.stdout if output is None else stack.enter_context(open(output, "w", newline=""))
        writer = None
        if output is not None and output.lower().endswith(".csv"):
            writer = csv.DictWriter(out, fieldnames=csv_columns(tasks, requests))
            writer.writeheader()
        for row in rows:
            if writer is None:
                out.write(json.dumps(row) + "\n")
            else:
                writer.writerow(flat_row(row, tasks))
            count += 1
    return count


def define_flags():
    flags.DEFINE_string("model", None, "A model folder, or a run folder WORKDIR/adapters/<task>.")
    flags.DEFINE_string("output", None, "Rows as .jsonl or .csv (default: JSONL on stdout).")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
    flags.DEFINE_multi_string("run", [], "With --requests: a LoRA run folder; repeated.")
    flags.DEFINE_string(
        "requests", None, "A .csv (columns path, task) or .jsonl file: each image for one task."
    )


def predict_files(
    model_path: str, patterns: Sequence[str], output: str | None, batch_size: int = 32
) -> int:
    """The command's work: predicts every image, writes the rows, prints a summary on stderr.
    Returns the exit status: 0, or 1 when no image was predicted (every file failed)."""
    if not patterns:
        raise ValueError("PATHS: give image files, folders or globs after the flags")
    if output and not output.lower().endswith((".jsonl", ".csv")):
        raise ValueError(f"--output: got {output!r}; allowed: a .jsonl or .csv file")
    paths = image_paths(patterns)
    model = open_model(model_path)
    return write_and_report(predict_paths(model, paths, batch_size), output, model.tasks)


def write_and_report(rows: Iterable[dict], output: str | None, tasks, requests=False) -> int:
    """Writes the rows (`write_rows`), prints the summary on stderr; returns the exit status:
    0, or 1 when no image was predicted (every file failed)."""
    skipped = []

    def noting_errors(rows):
        for row in rows:
            if "error" in row:
                skipped.append(row["path"])
            yield row

    count = write_rows(noting_errors(rows), output, tasks, requests)
    print(
        f"predict: {count} {'requests' if requests else 'images'}, {count - len(skipped)} "
        f"predicted, {len(skipped)} skipped; tasks {', '.join(tasks)}; rows in "
        f"{output or 'stdout'}",
        file=sys.stderr,
    )
    if count == len(skipped):
        print(f"error: no image was predicted: all {count} files failed", file=sys.stderr)
        return 1
    return 0


def predict_request_file(
    run_dirs: Sequence[str], requests_path: str, output: str | None, batch_size: int = 32
) -> int:
    """`--requests`: each image to its own task's run, in mixed-adapter batches
    (`mixed_requests`); rows and exit status as `predict_files`."""
    if not run_dirs:
        raise ValueError("--requests: give the runs that serve it as --run, one per task")
    if output and not output.lower().endswith((".jsonl", ".csv")):
        raise ValueError(f"--output: got {output!r}; allowed: a .jsonl or .csv file")
    opened = mixed_requests.open_runs(run_dirs)
    tasks = {name: model.tasks[name] for name, model in opened[1].items()}
    requests = mixed_requests.read_requests(requests_path, list(tasks))
    rows = mixed_requests.predict_requests(run_dirs, requests, batch_size, opened)
    return write_and_report(rows, output, tasks, requests=True)


def main(argv):
    args = flags.FLAGS
    if args.requests is not None:
        if args.model is not None or argv[1:]:
            raise ValueError("--requests: takes --run folders, not --model or PATHS")
        status = predict_request_file(args.run, args.requests, args.output, args.batch_size)
    elif args.model is None:
        raise ValueError("--model: give a model or run folder (or --requests with --run)")
    else:
        if args.run:
            raise ValueError("--run: only with --requests; for one model give --model")
        status = predict_files(args.model, argv[1:], args.output, args.batch_size)
    if status:
        sys.exit(status)


def cli():
    cli_lib.run(main, define_flags)


if __name__ == "__main__":
    cli()
