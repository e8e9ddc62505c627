"""What runs write for people: only process 0 writes metrics, results and TensorBoard events
(checkpoints are every process's), progress without a terminal is a line a minute, and the
TensorBoard scalars are metrics.jsonl's."""

import glob
import importlib.util
import json
import os
import struct
import sys
import types

import ml_collections
import numpy as np
import pytest

from jaxmerge import config_lib, config_resume, logs, training
from tests import tiny


def tiny_config(data_dir, **overrides):
    """tests/test_train.py's tiny run (digits, a mu/4 ViT on 8-pixel images), 10 steps."""
    return tiny.tiny_config(data_dir, **{"steps": 10, **overrides})


@pytest.fixture(scope="module")
def writer_run(data_dir, tmp_path_factory):
    """(run folder, result) of the tiny run trained as process 0."""
    workdir = tmp_path_factory.mktemp("process0")
    result = training.train_and_evaluate(tiny_config(data_dir), str(workdir))
    return training.run_dir(str(workdir), "lora", "digits"), result


def fake_process(monkeypatch, index: int) -> None:
    """Makes `logs` see this process as `index` of a multi-host job. Only `logs`: the data
    pipeline and Orbax would shard for hosts that do not exist here."""
    fake_jax = types.SimpleNamespace(process_index=lambda: index)
    monkeypatch.setattr(logs, "jax", fake_jax)


def read_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TFRecord-framed event files in `directory` (per record:
    8-byte length, 4-byte masked CRC of it, the Event proto, 4-byte masked CRC of that)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            header = raw[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", raw[offset + 8 : offset + 12])[0] == masked_crc32c(header)
            body = raw[offset + 12 : offset + 12 + length]
            assert struct.unpack("<I", raw[offset + 12 + length : offset + 16 + length])[
                0
            ] == masked_crc32c(body)
            offset += 16 + length
            event = event_pb2.Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_only_process_zero_writes_run_files(data_dir, tmp_path, monkeypatch, writer_run):
    directory, result = writer_run
    written = ["metrics.jsonl", "result.json", "checkpoints"]
    written += ["tensorboard"] if importlib.util.find_spec("tensorboardX") else []
    for name in written:
        assert os.path.exists(os.path.join(directory, name)), name
    assert not os.path.exists(os.path.join(directory, "run.lock"))  # released

    fake_process(monkeypatch, 1)
    other = training.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
    other_dir = training.run_dir(str(tmp_path), "lora", "digits")
    assert sorted(os.listdir(other_dir)) == ["checkpoints"]  # Orbax's, on every process
    assert os.listdir(os.path.join(other_dir, "checkpoints"))
    assert other == result  # the same run, only not written down


def test_tensorboard_scalars_equal_metrics_jsonl(writer_run):
    pytest.importorskip("tensorboardX")
    directory, result = writer_run
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10]
    scalars = read_scalars(os.path.join(directory, "tensorboard"))
    for key in ("loss", "accuracy", "grad_norm", "images_per_s", "learning_rate"):
        # float32 in the event file, float64 in the JSON line
        expected = [(r["step"], np.float32(r[key])) for r in train_records]
        assert scalars[f"train/{key}"] == expected, key
    assert train_records[-1]["learning_rate"] > 0
    assert scalars["test/accuracy"] == [(10, np.float32(result["accuracy"]))]


def test_tensorboard_off_or_not_installed_writes_no_events(tmp_path, monkeypatch, capsys):
    logs.Scalars(str(tmp_path / "off"), enabled=False).write("train", {"loss": 1.0}, 1)
    assert not (tmp_path / "off").exists()

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # its import now fails
    logs._summary_writer_class.cache_clear()
    try:
        for name in ("a", "b"):
            scalars = logs.Scalars(str(tmp_path / name), enabled=True)
            scalars.write("train", {"loss": 1.0}, 1)
            scalars.close()
    finally:
        logs._summary_writer_class.cache_clear()
    assert not list(tmp_path.iterdir())
    notes = [line for line in capsys.readouterr().out.splitlines() if "tensorboardX" in line]
    assert len(notes) == 1, notes  # said once, not per run


def test_append_jsonl_writes_on_process_zero_only(tmp_path, monkeypatch):
    path = str(tmp_path / "cache.jsonl")
    logs.append_jsonl(path, {"seed": 0})
    fake_process(monkeypatch, 3)
    logs.append_jsonl(path, {"seed": 1})
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"seed": 0}]


def test_progress_without_terminal_is_a_line_per_interval(monkeypatch, capsys):
    bar = logs.progress(range(3), desc="merges", unit="merge", interval=0.0)
    assert isinstance(bar, logs.LineProgress)  # pytest's stderr is no terminal
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("merges: 1/3 merge (") and len(lines) == 4
    assert lines[-1].startswith("merges: 3/3 merge, loss=0.5 (")

    slow = logs.progress(total=100, desc="lora:digits", unit="step")  # a line a minute
    slow.update(50)
    slow.close()
    assert capsys.readouterr().err.splitlines() == ["lora:digits: 50/100 step (0 s)"]

    monkeypatch.setattr(logs.sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(logs.progress(total=3), logs.tqdm)


def test_progress_on_other_processes_goes_to_absl(monkeypatch, capsys):
    fake_process(monkeypatch, 1)
    logged = []
    monkeypatch.setattr(logs.logging, "info", lambda *args: logged.append(args[0] % args[1:]))
    bar = logs.progress(total=2, desc="lora:digits", unit="step")
    bar.update(2)
    bar.close()
    logs.info("resumed from step 10")
    assert capsys.readouterr() == ("", "")
    assert logged == ["[process 1] lora:digits: 2/2 step (0 s)", "[process 1] resumed from step 10"]


def test_tensorboard_field_is_checked_and_result_neutral():
    # Built from a dict, as a config from JSON is: ConfigDict's own type check is not there.
    config = ml_collections.ConfigDict({**config_lib.base_config().to_dict(), "tensorboard": "yes"})
    with pytest.raises(ValueError, match=r"config.tensorboard: got 'yes'; allowed: True or False"):
        config_lib.validate(config)
    config_resume.check_unchanged({"tensorboard": True}, {"tensorboard": False}, "run")  # no error
