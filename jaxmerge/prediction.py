"""Predictions on image files: every task of a model, one row of readable predictions per image.

A model is a model folder (`jaxmerge.model_folder`) or one training run (its adapter folded
into its base): `open_model`. Paths are image files, folders (searched recursively for image
suffixes, hidden files such as .DS_Store skipped) or globs: `image_paths`. Each image is read
upright and prepared exactly as `prepare` and training prepared each task's images
(`jaxmerge.image_input`), and gives one row (`predict_paths`); an image that cannot be read
gives a row with an "error" field and the others go on. `predict_request_file` serves a file
of requests, each image for its own task's run, in mixed-adapter batches
(`jaxmerge.mixed_requests`). Rows are written as JSONL or CSV (`write_rows`, `csv_columns`,
`flat_row`). `python -m jaxmerge predict` is the command over it.
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
        f"a folder written by `python -m jaxmerge merge` or a run folder WORKDIR/adapters/<task>"
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
