"""Model folders against odd inputs: head kinds as one unit (decoding and CSV columns), an
edited and re-checksummed model.json, odd `--output` places, huge images, file modes."""

import csv
import dataclasses
import io

import numpy as np

from jaxmerge import heads, model_folder, predict


def test_a_new_head_kind_is_decoded_and_written_without_touching_callers(monkeypatch):
    """Decoding and CSV fields belong to the head kind: a kind registered in `HEAD_KINDS`
    alone flows through `outputs_to_predictions`, `csv_columns` and `flat_row`."""
    doubled = dataclasses.replace(
        heads.HEAD_KINDS["regression"],
        decode=lambda outputs, task, crops: [{"twice": 2 * float(v[0])} for v in outputs],
        columns=lambda task: ["twice"],
        flatten=lambda p: {"twice": p["twice"]},
    )
    monkeypatch.setitem(heads.HEAD_KINDS, "doubled", doubled)
    tasks = {
        "d": {"kind": "doubled", "outputs": 1},
        "c": {"kind": "classification", "outputs": 2, "labels": ["no", "yes"]},
    }
    outputs = {"d": np.array([[1.5], [-2.0]]), "c": np.array([[0.0, 1.0], [3.0, 0.0]])}
    rows = model_folder.outputs_to_predictions(outputs, tasks, [(4, 4), (4, 4)])
    assert [r["d"] for r in rows] == [{"twice": 3.0}, {"twice": -4.0}]
    assert [r["c"]["label"] for r in rows] == ["yes", "no"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=predict.csv_columns(tasks))
    writer.writeheader()
    for row in rows:
        writer.writerow(predict.flat_row({"path": "a.png", **row}, tasks))
    writer.writerow(predict.flat_row({"path": "b.png", "error": "OSError: bad"}, tasks))
    lines = out.getvalue().splitlines()
    assert lines[0] == "path,d.twice,c.label,c.probability,error"
    assert lines[1] == f"a.png,3.0,yes,{float(1 / (1 + np.exp(-1.0)))!r},"
    assert lines[3] == "b.png,,,,OSError: bad"


def test_landmark_columns_follow_the_points():
    tasks = {"box": {"kind": "landmarks", "outputs": 4}}
    assert predict.csv_columns(tasks) == ["path", "box.x0", "box.y0", "box.x1", "box.y1", "error"]
    row = {"path": "p", "box": {"points": [[1.0, 2.0], [3.0, 4.0]]}}
    assert predict.flat_row(row, tasks) == {
        "path": "p", "error": "", "box.x0": 1.0, "box.y0": 2.0, "box.x1": 3.0, "box.y1": 4.0,
    }  # fmt: skip
