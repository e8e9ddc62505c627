"""`predict --requests`: images of several tasks served together in mixed-adapter batches, each
request predicted as its own run alone predicts it (`predict --model RUN`), in CSV and JSONL,
and bad requests refused in one line before any image is read; on two tiny digit runs."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from jaxmerge import mixed_requests, prediction

TASKS = ("digits", "digit_box")


@pytest.fixture(scope="module")
def request_files(digit_runs, tmp_path_factory):
    """Five images of other sizes and modes, requested for the two tasks in turn (one twice)."""
    folder = tmp_path_factory.mktemp("requests")
    rng = np.random.default_rng(3)
    requests = []
    for i, (height, width, mode) in enumerate(
        [(20, 30, "RGB"), (40, 25, "L"), (16, 16, "RGBA"), (33, 33, "RGB"), (12, 50, "L")]
    ):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
        requests.append((str(path), TASKS[i % 2]))
    requests.append((requests[0][0], "digit_box"))  # the same image for the other task
    csv_path = folder / "requests.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "task"])
        writer.writerows(requests)
    jsonl_path = folder / "requests.jsonl"
    jsonl_path.write_text("".join(json.dumps({"path": p, "task": t}) + "\n" for p, t in requests))
    return requests, str(csv_path), str(jsonl_path)


def test_each_request_is_predicted_as_its_run_alone_predicts_it(digit_runs, request_files):
    run_dirs, _ = digit_runs
    requests, csv_path, _ = request_files
    # A batch of 4: two mixed batches, the second padded with base-only examples.
    rows = list(mixed_requests.predict_requests(run_dirs, requests, batch_size=4))
    alone = {task: prediction.open_model(d) for task, d in zip(TASKS, run_dirs)}
    assert [(r["path"], r["task"]) for r in rows] == requests
    for row in rows:
        task = row["task"]
        (want,) = prediction.predict_paths(alone[task], [row["path"]])
        assert set(row) == {"path", "task", task}
        if task == "digits":
            assert row[task]["label"] == want[task]["label"]
            np.testing.assert_allclose(
                row[task]["probability"], want[task]["probability"], atol=1e-5
            )
        else:
            np.testing.assert_allclose(row[task]["points"], want[task]["points"], atol=1e-4)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_the_command_writes_csv_and_jsonl_with_the_same_predictions(
    digit_runs, request_files, tmp_path
):
    run_dirs, _ = digit_runs
    requests, csv_path, jsonl_path = request_files
    out_jsonl, out_csv = tmp_path / "rows.jsonl", tmp_path / "rows.csv"
    assert prediction.predict_request_file(run_dirs, jsonl_path, str(out_jsonl), 8) == 0
    assert prediction.predict_request_file(run_dirs, csv_path, str(out_csv), 8) == 0
    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    with open(out_csv, newline="") as f:
        flat = list(csv.DictReader(f))
    assert len(rows) == len(flat) == len(requests)
    for row, line in zip(rows, flat):
        assert (line["path"], line["task"]) == (row["path"], row["task"]) and not line["error"]
        if row["task"] == "digits":
            assert line["digits.label"] == str(row["digits"]["label"])
            assert line["digit_box.x0"] == ""
        else:
            assert float(line["digit_box.x0"]) == pytest.approx(row["digit_box"]["points"][0][0])


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,task\na.png,textures\n", r"requests.csv:2: task 'textures' has no --run"),
        ("path,kind\na.png,digits\n", r"requests.csv:2: got .*allowed: the fields path and task"),
        ("path,task\n", "holds no request"),
    ],
)
def test_bad_requests_are_one_line_before_any_image_is_read(digit_runs, tmp_path, content, message):
    path = tmp_path / "requests.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        prediction.predict_request_file(digit_runs[0], str(path), None)


def test_a_file_that_cannot_be_read_is_one_row_with_its_error(digit_runs, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = list(mixed_requests.predict_requests(digit_runs[0], [(str(broken), "digits")], 2))
    assert rows[0]["task"] == "digits" and rows[0]["error"].startswith("UnidentifiedImageError")
