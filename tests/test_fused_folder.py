"""The fused model folder (`merge --fuse`): a round trip equal to the in-memory fused model,
predict on files, gates of one giving the `cat` merge (predictions and scores), and bad input
refused in one line before compute, on two tiny runs trained on scikit-learn digits."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxmerge import (
    adapter_stack,
    checkpoint,
    evaluation,
    fuse,
    fusion,
    image_input,
    merge_folder,
    model_folder,
    prediction,
)
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import common

TASKS = ["digits", "digit_box"]
FAST = {"images": 32, "steps": 5}  # a real fit, in a second


@pytest.fixture(scope="module")
def fused_folders(digit_runs, tmp_path_factory):
    """{gating: a fused folder of the two runs}, written by the merge command's function."""
    run_dirs, _ = digit_runs
    root = tmp_path_factory.mktemp("fused")
    folders = {}
    for gating in fusion.GATINGS:
        folder = str(root / gating)
        summary = merge_folder.merge_to_folder(
            run_dirs, None, folder, params=FAST, fuse_gating=gating
        )
        assert summary["fuse"] == gating and summary["tasks"] == TASKS
        folders[gating] = folder
    return folders


def images(count=5, size=8, seed=0):
    return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype(np.float32)


def _runs(run_dirs):
    runs = [runs_lib.load(d) for d in run_dirs]
    return (runs, *runs_lib.base_of(runs))


@pytest.mark.parametrize("gating", fusion.GATINGS)
def test_fused_folder_predicts_what_the_in_memory_fused_model_does(
    digit_runs, fused_folders, gating
):
    runs, model_def, base = _runs(digit_runs[0])
    settings = fuse.check(gating, FAST)
    gates, record = fuse.fuse_runs(runs, model_def, base, gating, settings, seed=0)
    tree = fusion.fused_tree(fuse.stack_runs(runs), gates, gating)
    batch = images()
    expected = fusion.fused_forward(
        model_def, [r.head_def for r in runs], base, tree, [r.head for r in runs], batch
    )
    model = model_folder.load(fused_folders[gating])
    outputs = model.predict(batch)
    assert list(outputs) == TASKS and model.merged is None
    for task, want in zip(TASKS, expected):
        np.testing.assert_allclose(outputs[task], want, rtol=1e-6, atol=1e-6)
    # The gates are stored as fitted: a refit with the same seed is the same.
    for path, gate in gates.items():
        stored = model_folder.fused.flat_gates(
            checkpoint.load(os.path.join(fused_folders[gating], "checkpoints"), 0)[0]["gates"],
            gating,
        )[path]
        for got, want in zip(jax.tree.leaves(stored), jax.tree.leaves(gate)):
            np.testing.assert_array_equal(got, want)

    info = model.info
    assert info["format"] == "jaxmerge.fused_model/1" and "merge" not in info
    fused = info["fusion"]
    assert fused["gating"] == gating and fused["tasks"] == TASKS
    assert fused["settings"]["images"] == 32 and fused["images_per_task"] == [32, 32]
    assert list(fused["objective"]) == list(fuse.FITS[gating])
    for source, run in zip(fused["runs"], runs):
        assert source["adapter_sha256"] == checkpoint.checksum(run.adapter)
        assert source["head_sha256"] == checkpoint.checksum(run.head)


def test_predict_on_a_fused_folder_is_the_model_on_the_prepared_inputs(fused_folders, tmp_path):
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(20, 30), (40, 25), (16, 16)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    rows_file = tmp_path / "rows.jsonl"
    assert prediction.predict_files(fused_folders["router"], [str(tmp_path)], str(rows_file)) == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    model = model_folder.load(fused_folders["router"])
    preprocessing = model.info["preprocessing"]
    for row in rows:
        rgb = common.load_upright(row["path"])
        outputs = {}
        for task in TASKS:
            record = image_input.task_input(model.tasks[task], preprocessing)
            prepared = image_input.model_input(rgb, preprocessing, record)
            outputs[task] = model.predict(prepared[None])[task]
        want = model_folder.outputs_to_predictions(outputs, model.tasks, [rgb.shape[:2]])[0]
        assert row["digits"]["label"] == want["digits"]["label"]
        np.testing.assert_allclose(
            row["digits"]["probability"], want["digits"]["probability"], atol=1e-6
        )
        np.testing.assert_allclose(row["digit_box"]["points"], want["digit_box"]["points"], 1e-5)


@pytest.fixture(scope="module")
def gates_of_one(digit_runs, tmp_path_factory):
    """A fused folder whose static gates are all 1, and the `cat` merge of the same runs."""
    run_dirs, _ = digit_runs
    runs, model_def, base = _runs(run_dirs)
    root = tmp_path_factory.mktemp("ones")
    record = {"gating": "static", "settings": {}, "objective": {}}
    info = model_folder.fused.describe_fused(runs, model_def, record)
    gates = fusion.init_gates(fuse.stack_runs(runs), "static", 1.0)
    with model_folder.staging.stage([("--output", str(root / "ones"))]) as partials:
        model_folder.write_fused(
            partials["--output"],
            info,
            base,
            {r.task.name: r.adapter for r in runs},
            gates,
            {r.task.name: r.head for r in runs},
        )
    merge_folder.merge_to_folder(run_dirs, "cat", str(root / "cat"), weights=[1.0, 1.0])
    return str(root / "ones"), str(root / "cat")


def test_static_gates_of_one_predict_the_cat_merge(gates_of_one):
    """sum_t 1 * s_t (x a_t) b_t is exactly `cat`'s adapter: the fused forward and the folded
    merge agree to float rounding."""
    ones, cat = (model_folder.load(folder) for folder in gates_of_one)
    assert ones.lora is not None and cat.lora is None
    batch = images(count=8, seed=1)
    fused_outputs, merged_outputs = ones.predict(batch), cat.predict(batch)
    for task in TASKS:
        np.testing.assert_allclose(fused_outputs[task], merged_outputs[task], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_evaluate_scores_a_folder_as_evaluate_scores_its_merged_runs(digit_runs, gates_of_one):
    """`evaluate --model` on the gates-of-one folder and on the cat folder gives what
    `evaluate --run ... --merge cat` gives."""
    run_dirs, data_dir = digit_runs
    ones, cat = (evaluation.evaluate_model(f, data_dir=str(data_dir)) for f in gates_of_one)
    runs = evaluation.evaluate_runs(run_dirs, "cat", [1.0, 1.0])
    assert ones["model"]["fuse"] == "static" and cat["model"]["method"] == "cat"
    for task in TASKS:
        assert ones[task]["single_adapter"] == runs[task]["single_adapter"] is not None
        for metric, value in runs[task].items():
            if metric != "single_adapter":
                np.testing.assert_allclose(ones[task][metric], value, rtol=1e-5)
                np.testing.assert_allclose(cat[task][metric], value, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "request_args, message",
    [
        (
            {"fuse_gating": "moe"},
            r"^--fuse: got 'moe'; allowed: one of \['static', 'router', 'mixture'\]$",
        ),
        ({"fuse_gating": "static", "method": "ties"}, r"^--method: got 'ties' with --fuse"),
        ({"fuse_gating": "static", "fold": True}, r"^--fold: got True with --fuse static"),
        ({"fuse_gating": "router", "weights": [1, 1]}, r"^--weights: got \[1.0, 1.0\] with"),
        ({"fuse_gating": "static", "params": {"rank": 2}}, r"unknown parameter\(s\) \['rank'\]"),
        ({"fuse_gating": "static", "params": {"steps": 0}}, r"^--merge_param steps: got 0;"),
        ({"method": None}, r"^--method: none given; allowed: one of \["),
    ],
)
def test_bad_requests_are_refused_before_anything_loads(tmp_path, request_args, message):
    args = {"method": None, **request_args}
    method = args.pop("method")
    with pytest.raises(ValueError, match=message):  # the runs need not even exist
        merge_folder.merge_to_folder(["no/such/run"], method, str(tmp_path / "out"), **args)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base_fingerprint": "0123456789abcdef"}, "runs were trained on different bases"),
        ("gelu_approximate", r"^--run: runs define different models .*gelu_approximate"),
    ],
)
def test_runs_of_other_bases_or_models_are_refused(
    digit_runs, tmp_path, monkeypatch, change, message
):
    """The checks of `runs.base_of`, on the second run as loaded (cheaper than training one)."""
    run_dirs, _ = digit_runs
    load = runs_lib.load

    def changed(directory):
        run = load(directory)
        if directory != run_dirs[1]:
            return run
        if change == "gelu_approximate":
            return dataclasses.replace(run, architecture={**run.architecture, change: True})
        return dataclasses.replace(run, **change)

    monkeypatch.setattr(runs_lib, "load", changed)
    with pytest.raises(ValueError, match=message):
        merge_folder.merge_to_folder(run_dirs, None, str(tmp_path / "f"), fuse_gating="static")
    assert not os.path.exists(tmp_path / "f") and os.listdir(tmp_path) == []


def _rewrite(folder, tmp_path, edit):
    """A copy of `folder` whose arrays `edit(params)` changed, written with model.json's
    checksum as a real folder is (a folder of another writer, not a corrupted one)."""
    params, _ = checkpoint.load(os.path.join(folder, "checkpoints"), 0)
    info = json.load(open(os.path.join(folder, "model.json")))
    target = tmp_path / "edited"
    target.mkdir()
    model_folder.folder.write_arrays(str(target), info, edit(params))
    return str(target)


def _wider_gates(params):
    gates = model_folder.fused.flat_gates(params["gates"], "static")
    wider = {
        path: np.append(gate, np.float32(1)).astype(np.float32) for path, gate in gates.items()
    }
    return {**params, "gates": model_folder.fused.nest_gates(wider)}


def _fewer_gates(params):
    gates = model_folder.fused.flat_gates(params["gates"], "static")
    fewer = dict(sorted(gates.items())[1:])
    return {**params, "gates": model_folder.fused.nest_gates(fewer)}


def _one_adapter(params):
    return {**params, "adapters": {"digits": params["adapters"]["digits"]}}


@pytest.mark.parametrize(
    "edit, message",
    [
        (_wider_gates, r"model.json: gates\['block_0/attention/query'\]: shapes \(3,\); "),
        (_fewer_gates, r"model.json: gates: targets .* \(1 vs 2\); allowed: gates learned for"),
        (_one_adapter, r"model.json: adapters: the checkpoint holds \['digits'\], for"),
    ],
    ids=["a gate per adapter too many", "a target without gates", "an adapter missing"],
)
def test_gates_that_do_not_match_the_adapters_are_refused(fused_folders, tmp_path, edit, message):
    folder = _rewrite(fused_folders["static"], tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        model_folder.load(folder)


@pytest.mark.parametrize("gating", fusion.ROUTERS)
def test_router_gates_that_do_not_match_the_adapters_are_refused(fused_folders, tmp_path, gating):
    def one_column(params):
        gates = model_folder.fused.flat_gates(params["gates"], gating)
        cut = {
            p: {**g, "kernel": g["kernel"][:, :1], "bias": g["bias"][:1]} for p, g in gates.items()
        }
        return {**params, "gates": model_folder.fused.nest_gates(cut)}

    folder = _rewrite(fused_folders[gating], tmp_path, one_column)
    message = rf"gates\['block_0/attention/query'\]: shapes .*{gating} gates of 2 adapters"
    with pytest.raises(ValueError, match=message):
        model_folder.load(folder)


def test_gates_that_do_not_match_are_refused_before_writing(digit_runs, fused_folders, tmp_path):
    runs, _, base = _runs(digit_runs[0])
    info = json.load(open(os.path.join(fused_folders["static"], "model.json")))
    three = {path: np.ones(3, np.float32) for path in adapter_stack.paths(fuse.stack_runs(runs))}
    with pytest.raises(ValueError, match=r"^gates\['block_0/attention/query'\]: shapes \(3,\)"):
        with model_folder.staging.stage([("--output", str(tmp_path / "f"))]) as partials:
            model_folder.write_fused(
                partials["--output"],
                info,
                base,
                {r.task.name: r.adapter for r in runs},
                three,
                {r.task.name: r.head for r in runs},
            )
    assert os.listdir(tmp_path) == []


def _flip_byte(path):
    content = bytearray(open(path, "rb").read())
    content[len(content) // 2] ^= 0x01
    open(path, "wb").write(bytes(content))


def test_a_tampered_fused_folder_is_refused(fused_folders, tmp_path):
    edited = shutil.copytree(fused_folders["router"], tmp_path / "json")
    _flip_byte(edited / "model.json")
    with pytest.raises(checkpoint.CheckpointError, match="model.json does not match the checksum"):
        model_folder.load(str(edited))
    corrupted = shutil.copytree(fused_folders["router"], tmp_path / "arrays")
    params = corrupted / "checkpoints" / "0" / "params"
    files = [os.path.join(r, f) for r, _, fs in os.walk(params) for f in fs]
    _flip_byte(max(files, key=os.path.getsize))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*checkpoints/0"):
        model_folder.load(str(corrupted))


def test_a_fused_folder_exports_nothing(fused_folders, tmp_path):
    for export, flag in [(model_folder.export_peft, "--export_peft"), (model_folder.export_hf, "")]:
        with pytest.raises(ValueError, match=f"{flag or '--export_hf'}: the model is fused"):
            export(fused_folders["static"], str(tmp_path / "out"))
