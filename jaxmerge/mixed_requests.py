"""Requests of several tasks served together: each image to its own task's adapter and head, in
mixed-adapter batches (`mixed_batch`: the base computed once per batch, each image's low-rank
branch gathered), as `python -m jaxmerge predict --run A --run B --requests FILE` does.

    rows = mixed_requests.predict_requests(["W/adapters/digits", "W/adapters/digit_box"],
                                           [("a.png", "digits"), ("b.png", "digit_box")])
    # rows[0] == {"path": "a.png", "task": "digits", "digits": {"label": "3", ...}}

Each image is read upright and prepared as its task's training images were, and decoded by its
task's head kind, through the same functions `predict` uses for a model folder
(`image_input`, `model_folder.outputs_to_predictions`); a request's prediction equals that of
its run alone (`predict --model RUN`) to float rounding.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxmerge import image_input, logs, mixed_batch, model_folder

FIELDS = ("path", "task")


def read_requests(path: str, tasks: Sequence[str]) -> list[tuple[str, str]]:
    """(image path, task) per request of a .csv file (columns `path`, `task`) or a .jsonl
    file ({"path": ..., "task": ...} per line); blank lines are skipped.

    Raises:
      ValueError: one line naming the file and line of a missing field or a task that no
        `--run` serves, before any image is read.
    """
    if not path.lower().endswith((".csv", ".jsonl")):
        raise ValueError(f"--requests: got {path!r}; allowed: a .csv or .jsonl file")
    if not os.path.isfile(path):
        raise ValueError(f"--requests: {path!r} does not exist; allowed: a .csv or .jsonl file")
    with open(path, newline="") as f:
        if path.lower().endswith(".csv"):
            lines = [(n + 2, row) for n, row in enumerate(csv.DictReader(f))]
        else:
            lines = []
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        lines.append((n, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"--requests: {path}:{n}: not JSON ({error})") from None
    requests = []
    for n, row in lines:
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in FIELDS):
            raise ValueError(
                f"--requests: {path}:{n}: got {row!r}; allowed: the fields path and task as text"
            )
        if row["task"] not in tasks:
            raise ValueError(
                f"--requests: {path}:{n}: task {row['task']!r} has no --run; allowed: one of "
                f"{list(tasks)}"
            )
        requests.append((row["path"], row["task"]))
    if not requests:
        raise ValueError(f"--requests: {path} holds no request")
    return requests


def open_runs(run_dirs: Sequence[str]) -> tuple[mixed_batch.Server, dict[str, Any]]:
    """(the mixed-batch server of the runs, {task: the run as a model}: its task's input
    record, preprocessing and decoding, as a model folder describes them)."""
    server = mixed_batch.from_runs(run_dirs)
    return server, {name: model_folder.from_run(d) for name, d in zip(server.names, run_dirs)}


def predict_requests(
    run_dirs: Sequence[str],
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    opened: tuple[mixed_batch.Server, dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per request, in order: {"path", "task", task: prediction} or, for a file that
    cannot be read, {"path", "task", "error"} (one line on stderr; the others go on). Batches
    are padded to `batch_size` with base-only examples, so the server compiles once.
    `opened`: `open_runs(run_dirs)` when the caller has it already."""
    if batch_size < 1:
        raise ValueError(f"--batch_size: got {batch_size}; allowed: an integer >= 1")
    server, described = opened or open_runs(run_dirs)
    unknown = sorted({task for _, task in requests} - set(server.names))
    if unknown:
        raise ValueError(f"requests: tasks {unknown} have no run; allowed: {list(server.names)}")
    bar = logs.progress(total=len(requests), desc="predict", unit="img")
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        rows: list[dict[str, Any]] = [{"path": p, "task": t} for p, t in chunk]
        inputs, names, shapes, good = [], [], [], []
        for index, (path, task) in enumerate(chunk):
            rgb, error = image_input.read_upright(path)
            if error is not None:
                rows[index]["error"] = error
                continue
            model = described[task]
            preprocessing = model.info["preprocessing"]
            record = image_input.task_input(model.tasks[task], preprocessing)
            inputs.append(image_input.model_input(rgb, preprocessing, record))
            names.append(task)
            shapes.append(rgb.shape[:2])
            good.append(index)
        if inputs:
            batch = np.zeros((max(batch_size, len(inputs)), *inputs[0].shape), np.float32)
            batch[: len(inputs)] = np.stack(inputs)
            padded = names + [None] * (len(batch) - len(names))
            outputs = server.serve(batch, padded)
            for i, index in enumerate(good):
                task = names[i]
                decoded = model_folder.outputs_to_predictions(
                    {task: outputs[i][None]}, {task: described[task].tasks[task]}, [shapes[i]]
                )
                rows[index].update(decoded[0])
        bar.update(len(chunk))
        yield from rows
    bar.close()
