"""Model folders against odd inputs: head kinds as one unit (decoding and CSV columns), an
edited and re-checksummed model.json, odd `--output` places, huge images, file modes."""

import copy
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import tracemalloc
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from jaxmerge import (
    checkpoint,
    heads,
    image_input,
    lora,
    merge_folder,
    model_folder,
    models,
    prediction,
)
from jaxmerge.datasets import common
from jaxmerge.models import vit


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
    writer = csv.DictWriter(out, fieldnames=prediction.csv_columns(tasks))
    writer.writeheader()
    for row in rows:
        writer.writerow(prediction.flat_row({"path": "a.png", **row}, tasks))
    writer.writerow(prediction.flat_row({"path": "b.png", "error": "OSError: bad"}, tasks))
    lines = out.getvalue().splitlines()
    assert lines[0] == "path,d.twice,c.label,c.probability,error"
    assert lines[1] == f"a.png,3.0,yes,{float(1 / (1 + np.exp(-1.0)))!r},"
    assert lines[3] == "b.png,,,,OSError: bad"


def test_landmark_columns_follow_the_points():
    tasks = {"box": {"kind": "landmarks", "outputs": 4}}
    assert prediction.csv_columns(tasks) == [
        "path",
        "box.x0",
        "box.y0",
        "box.x1",
        "box.y1",
        "error",
    ]
    row = {"path": "p", "box": {"points": [[1.0, 2.0], [3.0, 4.0]]}}
    assert prediction.flat_row(row, tasks) == {
        "path": "p", "error": "", "box.x0": 1.0, "box.y0": 2.0, "box.x1": 3.0, "box.y1": 4.0,
    }  # fmt: skip


# ----------------------------------------------------------------------------- a tiny folder


@pytest.fixture(scope="module")
def parts():
    """A random mu/4 ViT with a rank-2 adapter and two heads (3 classes; 2 landmark points),
    and the model.json content that describes them: no training needed."""
    model_def = vit.ViT(**vit.variant("mu/4", image_size=8))
    base = vit.init_params(model_def, jax.random.key(0))
    config = lora.LoraConfig(rank=2, targets=vit.TARGET_PRESETS["qv"])
    merged = lora.init_adapter(jax.random.key(1), base, config)
    feature = np.zeros((1, model_def.width), np.float32)
    head_defs = {"digits": heads.MlpHead(8, 3), "box": heads.MlpHead(0, 4)}
    head_params = {
        t: h.init(jax.random.key(2 + i), feature)["params"]
        for i, (t, h) in enumerate(head_defs.items())
    }

    def task(kind, head_def, **extra):
        record = heads.to_record(head_def)
        return {
            "kind": kind, "outputs": head_def.outputs, "hidden": record["hidden"],
            "head": record, "labels": None, "input": None,
            "metric": heads.HEAD_KINDS[kind].main_metric, "spec": {}, **extra,
        }  # fmt: skip

    keys = models.get("vit").architecture_keys
    info = {
        "format": model_folder.FORMAT,
        "model": {
            "family": "vit",
            "kwargs": {k: getattr(model_def, k) for k in keys},
            "dtype": "float32",
        },
        "tasks": {
            "digits": task("classification", head_defs["digits"], labels=["a", "b", "c"]),
            "box": task("landmarks", head_defs["box"], spec={"norm_points": [0, 1]}),
        },
        "preprocessing": image_input.describe(8, 3, {"mean": [0.5], "std": [0.5]}),
        "folded": False,
        "merge": {"method": "cat", "runs": []},
    }
    return info, base, merged, head_params


def _write_edited(folder, parts, edit) -> str:
    """A folder of `parts`' arrays whose model.json is `edit`ed and checksummed anew, as
    someone who edits the file and fixes the checksum makes it (what `save` writes)."""
    info, base, merged, head_params = parts
    info = copy.deepcopy(info)
    edit(info)
    os.makedirs(folder)
    text = json.dumps(info, indent=2) + "\n"
    with open(os.path.join(folder, model_folder.MODEL_FILE), "w") as f:
        f.write(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    metadata = {"format": model_folder.FORMAT, "model_json_sha256": sha}
    manager = checkpoint.manager(os.path.join(folder, model_folder.CHECKPOINTS), max_to_keep=1)
    params = {"base": base, "merged": merged, "heads": head_params}
    checkpoint.save(manager, 0, params, {"none": np.zeros((), np.int8)}, metadata)
    manager.close()
    return folder


def test_a_described_folder_loads_and_predicts(parts, tmp_path):
    info, base, merged, head_params = parts
    model = model_folder.load(
        model_folder.save(str(tmp_path / "m"), info, base, merged, head_params)
    )
    outputs = model.predict(np.zeros((2, 8, 8, 3), np.float32))
    assert outputs["digits"].shape == (2, 3) and outputs["box"].shape == (2, 4)


def _set(path, value):
    def edit(info):
        *parents, leaf = path
        target = info
        for key in parents:
            target = target[key]
        target[leaf] = value

    return edit


def _drop_box(info):
    del info["tasks"]["box"]


def _five_classes(info):
    digits = info["tasks"]["digits"]
    digits["outputs"] = digits["head"]["outputs"] = 5
    digits["labels"] = None


EDITS = {
    "regression kind": (_set(("tasks", "digits", "kind"), "regression"), "tasks.digits.outputs"),
    "classification kind": (_set(("tasks", "box", "kind"), "classification"), "tasks.box.kind"),
    "unknown kind": (_set(("tasks", "box", "kind"), "boxes"), "tasks.box.kind"),
    "a head dropped": (_drop_box, "tasks"),
    "classes, record too": (_five_classes, "tasks.digits.outputs"),
    "classes, task only": (_set(("tasks", "digits", "outputs"), 4), "tasks.digits.head.outputs"),
    "hidden": (_set(("tasks", "digits", "head", "hidden"), 4), "tasks.digits.head.hidden"),
    "labels": (_set(("tasks", "digits", "labels"), ["a", "b"]), "tasks.digits.labels"),
    "width": (_set(("model", "kwargs", "width"), 48), "model.kwargs"),
    "folded": (_set(("folded",), True), "folded"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_and_rechecksummed_model_json_is_refused_naming_the_field(parts, tmp_path, case):
    """Saved anew (so model.json's checksum matches) with one field changed: refused on load
    with one line naming that field, not a KeyError or nonsense predictions."""
    edit, field = EDITS[case]
    folder = _write_edited(str(tmp_path / "m"), parts, edit)
    with pytest.raises(ValueError, match=rf"model\.json: {re.escape(field)}: ") as caught:
        model_folder.load(folder)
    assert "\n" not in str(caught.value) and "write the model again" in str(caught.value)


# ----------------------------------------------------------------------------- --output places

TIES = dict(method="ties", weights=[0.5, 0.5], params={"density": 0.5})


def _save(parts, folder):
    info, base, merged, head_params = parts
    return model_folder.save(str(folder), info, base, merged, head_params)


def _hidden(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("."))


def test_a_symlink_to_an_empty_folder_receives_the_model(parts, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    written = _save(parts, tmp_path / "link")
    assert written == str(tmp_path / "target") and (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path / "link")) == ["checkpoints", "model.json"]
    model_folder.load(str(tmp_path / "link"))
    assert _hidden(tmp_path) == []


def test_a_mount_point_or_an_unwritable_parent_is_refused_before_anything(
    parts, tmp_path, monkeypatch
):
    (tmp_path / "mnt").mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(tmp_path / "mnt") or real_ismount(p))
    with pytest.raises(ValueError, match=r"^--output: .*mnt' is a mount point"):
        merge_folder.merge_to_folder(["no/such/run"], output=str(tmp_path / "mnt"), **TIES)
    monkeypatch.undo()
    (tmp_path / "ok").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: p != str(tmp_path) and real_access(p, m))
    with pytest.raises(ValueError, match=r"^--export_hf: cannot write in .*no write permission"):
        merge_folder.merge_to_folder(
            ["no/such/run"], output=str(tmp_path / "ok" / "new" / "m"),
            export_hf=str(tmp_path / "hf"), **TIES,
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["mnt", "ok"] and os.listdir(tmp_path / "ok") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused(parts, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    with pytest.raises(ValueError, match=r"^--output: cannot write in"):
        _save(parts, tmp_path / "ro" / "m")


def test_a_failing_write_or_rename_is_one_line_and_leaves_nothing(parts, tmp_path, monkeypatch):
    """The checks cannot see everything (a read-only file system, a mount point that reports
    itself as an ordinary folder): the partial folder's creation and the final rename fail in
    one line, and nothing is left behind."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", refuse)
        with pytest.raises(ValueError, match=r"^--output: cannot write beside .*Read-only"):
            _save(parts, tmp_path / "m")
    (tmp_path / "busy").mkdir()
    real_rename = os.rename

    def busy(source, target):
        if target == str(tmp_path / "busy"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", busy)
        with pytest.raises(ValueError, match=r"^--output: could not put .*a mount point\?"):
            _save(parts, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == [] and _hidden(tmp_path) == []


def test_a_concurrent_merge_into_the_same_folder_is_one_line(parts, tmp_path):
    """Two writers staged at once: the second rename meets the first's model (ENOTEMPTY)."""
    target = tmp_path / "m"
    with pytest.raises(ValueError, match=r"^--output: could not put .* another process") as e:
        with model_folder.staging.stage([("--output", str(target))]) as partials:
            _save(parts, target)  # the other merge finishes first
            open(os.path.join(partials["--output"], "model.json"), "w").close()
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(target)) == ["checkpoints", "model.json"] and _hidden(tmp_path) == []
    model_folder.load(str(target))  # the first model is intact


def test_output_and_export_at_one_place_are_refused_before_anything(tmp_path):
    for export in ("export_peft", "export_hf"):
        for place in ("m", "m/inside"):
            with pytest.raises(
                ValueError, match=rf"^--{export}: .* is, or is inside, the --output"
            ):
                merge_folder.merge_to_folder(
                    ["no/such/run"], output=str(tmp_path / "m"),
                    **{export: str(tmp_path / place)}, **TIES,
                )  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_stale_partials_of_dead_merges_are_removed(parts, tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        "dead": f".m.partial-{host}-{dead.pid}-abc",
        "alive": f".m.partial-{host}-{os.getpid()}-abc",
        "other host": f".m.partial-elsewhere-{dead.pid}-abc",
        "old format, old": ".m.partial-k2j3h4",
        "old format, fresh": ".n.partial-x9y8z7",
        "not ours": ".partial-notes",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    day_ago = time.time() - 86400
    os.utime(tmp_path / names["old format, old"], (day_ago, day_ago))
    _save(parts, tmp_path / "m")
    kept = {label for label, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"alive", "other host", "old format, fresh", "not ours"}


def test_exports_are_written_whole_through_a_partial(parts, tmp_path, monkeypatch):
    folder = _save(parts, tmp_path / "m")
    seen = []
    real_write = model_folder.export.write_peft
    monkeypatch.setattr(
        model_folder.export, "write_peft", lambda m, d, *a: seen.append(d) or real_write(m, d, *a)
    )
    exported = model_folder.export_peft(folder, str(tmp_path / "peft"))
    assert os.path.basename(seen[0]).startswith(".peft.partial-")
    assert exported == str(tmp_path / "peft") and "adapter_config.json" in os.listdir(exported)
    assert _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- predict, exports


def test_predict_exits_1_when_no_image_was_predicted(parts, tmp_path, capsys):
    folder = _save(parts, tmp_path / "m")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "fine.png")
    rows = str(tmp_path / "rows.jsonl")
    assert prediction.predict_files(folder, [str(tmp_path / "junk.png")], rows) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: no image was predicted: all 1 files failed"
    )
    paths = [str(tmp_path / "junk.png"), str(tmp_path / "fine.png")]
    assert prediction.predict_files(folder, paths, rows) == 0


def _png_header_only(path, width, height, bit_depth=16):
    """A grey PNG that says it is width x height, with one row of data: what `Image.open`
    sees is a huge image, though the file is a few hundred bytes."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + width * bit_depth // 8))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")
    )


def test_a_huge_image_is_refused_from_its_header_naming_its_pixels(tmp_path):
    _png_header_only(tmp_path / "scan.png", 13300, 13300)
    bound = f"{common.MAX_PIXELS:,}"
    with pytest.raises(ValueError, match=rf"13300 x 13300 = 176,890,000 pixels; .*most {bound}"):
        common.load_rgb(tmp_path / "scan.png")
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # over PIL's own error bound
    with pytest.raises(ValueError, match=r"400000000 pixels.*allowed: at most"):
        common.load_upright(tmp_path / "bomb.png")
    row = next(prediction.predict_paths(None, [str(tmp_path / "scan.png")]))
    assert "176,890,000 pixels" in row["error"]


def test_16_bit_levels_are_scaled_in_a_uint32_buffer():
    levels = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(common.scale_16_to_8(levels), np.round(levels / 257))
    scan = np.tile(levels[::65], (1000, 2))  # 1000 x 2018 16-bit pixels
    tracemalloc.start()
    common.scale_16_to_8(scan)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * scan.size  # int64 temporaries took 16 bytes a pixel and more
    with pytest.raises(ValueError, match="grey levels span 0..70000"):
        common.scale_16_to_8(np.array([0, 70000], np.int32))


def test_hf_export_files_follow_the_umask(parts, tmp_path):
    folder = _save(parts, tmp_path / "m")
    umask = os.umask(0o027)
    try:
        exported = model_folder.export_hf(folder, str(tmp_path / "hf"))
    finally:
        os.umask(umask)
    modes = {
        name: os.stat(os.path.join(exported, name)).st_mode & 0o777 for name in os.listdir(exported)
    }
    assert modes == {"config.json": 0o640, "model.safetensors": 0o640}
    assert os.stat(exported).st_mode & 0o777 == 0o750
