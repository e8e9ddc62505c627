"""The multi-task model folder: a round trip equal to the in-memory merge (folded or not),
checksums on load, no overwriting, the PEFT export, predictions on odd image files, and the
merge and predict commands end to end, on two tiny runs trained on scikit-learn digits."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image, ImageOps

from jaxmerge import (
    checkpoint,
    image_input,
    input_pipeline,
    learned,
    lora,
    merge_folder,
    merging,
    model_folder,
    prediction,
    run_config,
    training,
)
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import common, prepare
from jaxmerge.input_pipeline import sources
from jaxmerge.interop import peft
from jaxmerge.model_folder import multitask
from jaxmerge.models import vit
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("digits", "digit_box")
TIES = dict(method="ties", weights=[0.5, 0.5], params={"density": 0.5})


@pytest.fixture(scope="module")
def run_dirs(digit_runs):
    """Two LoRA runs of 10 steps on one random base: digit classes and digit boxes."""
    return digit_runs[0]


@pytest.fixture(scope="module")
def ties_folder(run_dirs, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("models") / "ties")
    merge_folder.merge_to_folder(run_dirs, output=folder, **TIES)
    return folder


def images(count=5, size=8, seed=0):
    return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype(np.float32)


def in_memory_outputs(run_dirs, method, weights, params, batch):
    """fold_into_base(base, merging.merge(...)) then one multitask_forward: the reference."""
    runs = [runs_lib.load(d) for d in run_dirs]
    model_def, base = runs_lib.base_of(runs)
    merged = merging.merge(
        [r.adapter for r in runs], method, weights, key=jax.random.key(0), **params
    )
    backbone = lora.fold_into_base(base, merged)
    head_defs = {r.task.name: r.head_def for r in runs}
    heads = {r.task.name: r.head for r in runs}
    return multitask.multitask_forward(model_def, head_defs, backbone, heads, batch), runs


@pytest.mark.parametrize("fold", [False, True])
def test_folder_predicts_what_the_in_memory_merge_does(run_dirs, tmp_path, fold):
    folder = str(tmp_path / "model")
    summary = merge_folder.merge_to_folder(run_dirs, output=folder, fold=fold, **TIES)
    assert summary["folded"] is fold and summary["tasks"] == list(TASKS)
    model = model_folder.load(folder)
    batch = images()
    expected, runs = in_memory_outputs(run_dirs, "ties", [0.5, 0.5], {"density": 0.5}, batch)
    outputs = model.predict(batch)
    assert list(outputs) == list(TASKS)
    for task in TASKS:
        np.testing.assert_allclose(outputs[task], expected[task], rtol=1e-5, atol=1e-6)
    params, _ = checkpoint.load(os.path.join(folder, "checkpoints"), step=0)
    assert set(params) == ({"base", "heads"} if fold else {"base", "merged", "heads"})
    assert (model.merged is None) is fold

    info = json.load(open(os.path.join(folder, "model.json")))
    assert info["model"]["kwargs"]["image_size"] == 8 and info["model"]["family"] == "vit"
    assert info["tasks"]["digits"]["labels"] == [str(d) for d in range(10)]
    assert info["tasks"]["digits"]["metric"] == "accuracy"
    assert info["tasks"]["digit_box"]["labels"] is None
    assert info["tasks"]["digit_box"]["spec"] == {"norm_points": [0, 1]}
    assert info["preprocessing"]["normalisation"] == "[-1, 1]"
    assert info["base_fingerprint"] == runs[0].base_fingerprint
    assert info["merge"]["method"] == "ties" and info["merge"]["params"] == {"density": 0.5}
    for source, run in zip(info["merge"]["runs"], runs):
        assert source["adapter_sha256"] == checkpoint.checksum(run.adapter)
        assert source["head_sha256"] == checkpoint.checksum(run.head)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_learned_merge_stores_a_record_that_rebuilds_it(run_dirs, tmp_path):
    folder = str(tmp_path / "learned")
    params = {"images": 16, "steps": 3}
    merge_folder.merge_to_folder(run_dirs, "learned_output_match", folder, params=params)
    model = model_folder.load(folder)
    record = model.info["merge"]["learned"]
    assert record["settings"]["granularity"] == "core" and record["images_per_task"] == 16
    adapters = [runs_lib.load(d).adapter for d in run_dirs]
    coefficients = learned.coefficients_from_json(record["coefficients"], "core")
    rebuilt = learned.rebuild(adapters, coefficients, "core")
    for got, want in zip(jax.tree.leaves(model.merged), jax.tree.leaves(rebuilt)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _flip_byte(path, offset=None):
    content = bytearray(open(path, "rb").read())
    offset = len(content) // 2 if offset is None else offset
    content[offset] ^= 0x01
    open(path, "wb").write(bytes(content))


def test_an_edited_model_json_is_refused(ties_folder, tmp_path):
    folder = shutil.copytree(ties_folder, tmp_path / "copy")
    _flip_byte(folder / "model.json")
    with pytest.raises(checkpoint.CheckpointError, match="model.json does not match the checksum"):
        model_folder.load(str(folder))


def test_a_corrupted_checkpoint_is_refused_and_left_as_it_is(ties_folder, tmp_path):
    folder = shutil.copytree(ties_folder, tmp_path / "copy")
    params = folder / "checkpoints" / "0" / "params"
    files = [os.path.join(r, f) for r, _, fs in os.walk(params) for f in fs]
    _flip_byte(max(files, key=os.path.getsize))  # the array data
    before = sorted(os.listdir(folder))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*checkpoints/0"):
        model_folder.load(str(folder))
    assert sorted(os.listdir(folder)) == before  # nothing moved aside inside a model


def test_an_existing_folder_is_never_overwritten(ties_folder, tmp_path):
    before = open(os.path.join(ties_folder, "model.json")).read()
    # Checked before anything loads: the runs given need not even exist.
    with pytest.raises(ValueError, match=r"--output: .* exists and is not empty"):
        merge_folder.merge_to_folder(["no/such/run"], output=ties_folder, **TIES)
    assert open(os.path.join(ties_folder, "model.json")).read() == before
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        merge_folder.merge_to_folder(["no/such/run"], output=str(file), **TIES)


def test_an_empty_folder_is_written_into(run_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    merge_folder.merge_to_folder(run_dirs, output=str(tmp_path / "empty"), **TIES)
    assert sorted(os.listdir(tmp_path / "empty")) == ["checkpoints", "model.json"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no partial left


def test_peft_export_loads_back_to_the_same_deltas(ties_folder, tmp_path):
    model = model_folder.load(ties_folder)
    exported = model_folder.export_peft(model, str(tmp_path / "peft"))
    adapter, head, config = peft.load_peft_adapter(exported)
    assert head is None and config["peft_type"] == "LORA"
    want, got = lora.delta_weights(model.merged), lora.delta_weights(adapter)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_peft_export_refuses_folded_models_and_dense_deltas(run_dirs, tmp_path):
    with pytest.raises(ValueError, match="saved folded"):
        merge_folder.merge_to_folder(
            run_dirs, output=str(tmp_path / "f"), fold=True, export_peft=str(tmp_path / "p"), **TIES
        )
    with pytest.raises(ValueError, match="'task_arithmetic' returned dense deltas"):
        merge_folder.merge_to_folder(
            run_dirs, "task_arithmetic", str(tmp_path / "ta"), export_peft=str(tmp_path / "p")
        )
    assert not os.path.exists(tmp_path / "f") and not os.path.exists(tmp_path / "ta")
    merge_folder.merge_to_folder(run_dirs, output=str(tmp_path / "folded"), fold=True, **TIES)
    with pytest.raises(ValueError, match="saved folded"):
        model_folder.export_peft(str(tmp_path / "folded"), str(tmp_path / "p"))


@pytest.mark.parametrize("naming", ["v4", "v5"])
def test_golden_hf_export_of_a_folded_ties_merge_gives_pefts_merge(naming):
    """scripts/make_golden.py wrote these with `save_hf_vit` (now `vit.save_hf`) and checked
    that transformers' ViTModel loads them to jaxmerge's outputs (3e-7); here they must give
    PEFT's own TIES merge of the same adapters (an independent truth)."""
    golden = os.path.join(ROOT, "tests", "golden")
    vit_kwargs, params, _ = vit.load_hf(os.path.join(golden, "hf_exports", f"folded_ties_{naming}"))
    arrays = np.load(os.path.join(golden, "outputs.npz"))
    tokens = vit.ViT(**vit_kwargs).apply({"params": params}, arrays["images"])["tokens"]
    np.testing.assert_allclose(
        tokens, arrays["merge/ties_total/last_hidden_state"], rtol=1e-4, atol=1e-5
    )


def test_hf_export_round_trips_the_backbone(run_dirs, tmp_path):
    summary = merge_folder.merge_to_folder(
        run_dirs, output=str(tmp_path / "m"), export_hf=str(tmp_path / "hf"), **TIES
    )
    model = model_folder.load(summary["output"])
    vit_kwargs, params, head = vit.load_hf(summary["hf"])
    assert head is None and vit_kwargs == model.info["model"]["kwargs"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.backbone)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="exists and is not empty"):
        model_folder.export_hf(model, summary["hf"])


def test_hf_export_refuses_what_a_vit_model_cannot_hold(run_dirs, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--export_hf"):
        merge_folder.merge_to_folder(
            run_dirs, output=str(tmp_path / "m"), export_hf=str(tmp_path / "taken"), **TIES
        )
    assert not os.path.exists(tmp_path / "m")  # refused before anything was written
    mean_pool = vit.ViT(**vit.variant("mu/4", image_size=8, pool="mean"))
    with pytest.raises(ValueError, match="pools by 'mean'; allowed: pool='cls'"):
        model_folder.check_hf_exportable(mean_pool, "vit")


def test_peft_folders_merge_into_a_model_that_gives_transformers_logits(tmp_path):
    """Two PEFT classifier folders (the golden `cls` adapter twice) merged with `cat` at 0.5
    each are the adapter itself: each task's logits equal transformers + PEFT's."""
    golden = os.path.join(ROOT, "tests", "golden")
    shutil.copytree(os.path.join(golden, "adapters", "cls"), tmp_path / "cls_copy")
    folders = [os.path.join(golden, "adapters", "cls"), str(tmp_path / "cls_copy")]
    summary = merge_folder.merge_to_folder(
        [], "cat", str(tmp_path / "m"), weights=[0.5, 0.5], peft_folders=folders,
        base=os.path.join(golden, "hf_vit"),
    )  # fmt: skip
    assert summary["tasks"] == ["cls", "cls_copy"]
    arrays = np.load(os.path.join(golden, "outputs.npz"))
    outputs = model_folder.load(summary["output"]).predict(arrays["images"])
    for task in summary["tasks"]:
        np.testing.assert_allclose(outputs[task], arrays["adapter/cls/logits"], atol=1e-5)


def test_peft_folders_without_a_classifier_or_a_base_are_refused(tmp_path):
    golden = os.path.join(ROOT, "tests", "golden")
    with pytest.raises(ValueError, match="has no classifier"):
        merge_folder.load_peft_run(
            os.path.join(golden, "adapters", "a"), os.path.join(golden, "hf_vit")
        )
    with pytest.raises(ValueError, match="--base: .*nowhere.* is not a folder"):
        merge_folder.load_peft_run(
            os.path.join(golden, "adapters", "cls"), str(tmp_path / "nowhere")
        )


def test_outputs_to_predictions_are_in_task_units():
    tasks = {
        "kind": {"kind": "classification", "outputs": 3, "labels": ["cat", "dog", "owl"]},
        "age": {"kind": "regression", "outputs": 1, "spec": {"mean": 30.0, "std": 10.0}},
        "box": {"kind": "landmarks", "outputs": 4},
    }
    outputs = {
        "kind": np.array([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]]),
        "age": np.array([[0.5], [-1.0]]),
        "box": np.array([[0.25, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]),
    }
    rows = model_folder.outputs_to_predictions(outputs, tasks, [(48, 64), (10, 20)])
    assert rows[0]["kind"]["label"] == "dog" and rows[1]["kind"]["label"] == "cat"
    assert rows[0]["kind"]["probability"] == pytest.approx(np.exp(2) / (np.exp(2) + 2))
    assert rows[0]["age"]["value"] == pytest.approx(35.0) and rows[1]["age"]["value"] == 20.0
    # The input is the centre square: 48 px from x = 8 of the 64 x 48 image, 10 px from x = 5.
    assert rows[0]["box"]["points"] == [[8 + 12.0, 24.0], [8 + 48.0, 48.0]]
    assert rows[1]["box"]["points"] == [[5.0, 0.0], [10.0, 5.0]]


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """One digit as grey, RGBA, 16-bit and CMYK files, a truncated JPEG, and junk files."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("images")
    digit = np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    (folder / "sub").mkdir()
    Image.fromarray(digit).save(folder / "grey.png")
    Image.fromarray(digit).convert("RGBA").save(folder / "rgba.png")  # opaque: the same pixels
    Image.fromarray(digit.astype(np.uint16) * 257).save(folder / "sub" / "sixteen.png")
    Image.fromarray(digit).resize((64, 48)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(digit).save(folder / "sub" / "whole.jpg")
    jpeg = (folder / "sub" / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_reads_odd_images_and_skips_broken_ones(ties_folder, odd_images, capsys):
    assert Image.open(odd_images / "sub" / "sixteen.png").mode.startswith("I;16")
    paths = prediction.image_paths([str(odd_images)])
    names = [os.path.relpath(p, odd_images) for p in paths]
    assert names == ["cmyk.jpg", "grey.png", "rgba.png", "truncated.jpg"] + [
        "sub/sixteen.png",
        "sub/whole.jpg",
    ]
    model = model_folder.load(ties_folder)
    rows = {os.path.basename(r["path"]): r for r in prediction.predict_paths(model, paths, 4)}
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "truncated.jpg" in skipped[0]
    assert set(rows["truncated.jpg"]) == {"path", "error"}
    for name in ("cmyk.jpg", "grey.png", "rgba.png", "sixteen.png", "whole.jpg"):
        assert set(rows[name]) == {"path", *TASKS}, rows[name]
    grey = rows["grey.png"]
    for same in ("rgba.png", "sixteen.png"):  # decoded to the same RGB pixels
        assert rows[same]["digits"] == grey["digits"]
        np.testing.assert_allclose(rows[same]["digit_box"]["points"], grey["digit_box"]["points"])
    # The same picture read directly: pixel coordinates of the 64 x 48 original, whose centre
    # square (48 px from x = 8) the model saw.
    rgb = common.load_upright(odd_images / "cmyk.jpg")
    record = image_input.task_input(model.tasks["digit_box"], model.info["preprocessing"])
    assert record == {"size": 32, "channels": 1, "encoding": "png"}  # as digit_box stores
    assert model.tasks["digits"]["input"] == {"size": 8, "channels": 1, "encoding": "png"}
    batch = image_input.model_input(rgb, model.info["preprocessing"], record)
    box = model.predict(batch[None])["digit_box"][0].reshape(2, 2) * 48 + [8, 0]
    np.testing.assert_allclose(rows["cmyk.jpg"]["digit_box"]["points"], box, atol=0.01)


def test_predict_refuses_paths_that_match_nothing(tmp_path):
    with pytest.raises(ValueError, match="not a file, a folder or a glob"):
        prediction.image_paths([str(tmp_path / "missing*.png")])
    (tmp_path / ".DS_Store").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        prediction.image_paths([str(tmp_path)])


def test_a_run_folder_predicts_with_its_adapter_folded(run_dirs):
    model = prediction.open_model(run_dirs[0])
    run = runs_lib.load(run_dirs[0])
    model_def, base = runs_lib.base_of([run])
    single = multitask.make_single_task_predictor(model_def, run.head_def)
    batch = images()
    expected = single(lora.fold_into_base(base, run.adapter), run.head, batch)
    assert list(model.tasks) == ["digits"] and model.tasks["digits"]["labels"][3] == "3"
    np.testing.assert_allclose(model.predict(batch)["digits"], expected, rtol=1e-5, atol=1e-6)


def _command(command, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "jaxmerge", command, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # end to end through subprocesses: CI runs it in its own step
def test_merge_then_predict_commands(run_dirs, odd_images, tmp_path):
    output = tmp_path / "model"
    runs = [a for d in run_dirs for a in ("--run", d)]
    merged = _command(
        "merge",
        *runs,
        "--method=ties",
        "--weights=0.5,0.5",
        "--merge_param=density=0.5",
        f"--output={output}",
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged.stdout)["output"] == str(output)

    again = _command("merge", *runs, "--method=ties", f"--output={output}")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --output: {str(output)!r} exists and is not empty; allowed: a new or empty "
        f"folder (remove it or choose another)"
    ]

    rows_file = tmp_path / "rows.jsonl"
    predicted = _command(
        "predict",
        f"--model={output}",
        "--batch_size=2",
        f"--output={rows_file}",
        odd_images,
        odd_images / "grey.png",
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert "skipped" in predicted.stderr and "truncated.jpg" in predicted.stderr
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 6  # grey.png named twice is read once
    good = [r for r in rows if "error" not in r]
    assert len(good) == 5 and all(r["digits"]["label"] in "0123456789" for r in good)
    assert all(len(r["digit_box"]["points"]) == 2 for r in good)

    csv_file = tmp_path / "rows.csv"
    single = _command(
        "predict",
        f"--model={run_dirs[0]}",
        f"--output={csv_file}",
        odd_images / "sub" / "*.png",
    )
    assert single.returncode == 0, single.stderr[-2000:]
    lines = csv_file.read_text().splitlines()
    assert lines[0] == "path,digits.label,digits.probability,error" and len(lines) == 2


def test_runs_normalised_differently_cannot_share_a_folder():
    from types import SimpleNamespace

    import ml_collections

    def run(directory, **model):
        config = ml_collections.ConfigDict({"model": {"family": "vit", **model}})
        return SimpleNamespace(directory=directory, parts=run_config.of_saved(config))

    same = [run("a"), run("b", pixel_mean=[0.5], pixel_std=[0.5])]
    model_folder.check_one_normalization(same)  # the family's default, recorded or not
    imagenet = run("c", pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225])
    with pytest.raises(ValueError, match=r"^--run: runs trained on differently normalised"):
        model_folder.check_one_normalization([*same, imagenet])


def _exif_rotated(pixels: np.ndarray, path) -> None:
    """Saves `pixels` turned 90 degrees counter-clockwise, with EXIF orientation 6 (turn 90
    degrees clockwise to show): a viewer shows `pixels`."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(pixels)).save(path, exif=exif)


def _smooth(rng, height, width):
    """Random colours on a 3 x 3 grid, bilinearly enlarged: pictures far apart from each other
    that JPEG keeps within a few levels."""
    grid = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 2-step LoRA run on an image_folder of 2 x 5 random non-square files, stored at 32 px
    (the model takes 8 px), one of them EXIF-rotated."""
    root = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(5):
            height, width = (int(v) for v in rng.integers(20, 70, 2))
            Image.fromarray(_smooth(rng, height, width)).save(root / name / f"{i}.png")
    _exif_rotated(_smooth(rng, 30, 55), root / "a" / "5.png")
    data_dir = tmp_path_factory.mktemp("pics_tfds")
    prepare.prepare("image_folder/pics-size32", str(data_dir), str(root))
    workdir = tmp_path_factory.mktemp("pics_work")
    config = tiny_config(
        data_dir,
        task="pics",
        steps=2,
        warmup_steps=0,
        checkpoint_every=2,
        log_every=2,
        **{"dataset.name": "image_folder/pics-size32"},
    )
    training.train_and_evaluate(config, str(workdir))
    return root, config, str(workdir / "adapters" / "pics")


def test_predict_on_a_file_is_the_model_on_what_prepare_stored_for_it(folder_run):
    root, config, run_dir = folder_run
    files = sorted(str(p) for p in root.glob("*/*.png"))
    model = prediction.open_model(run_dir)
    assert model.tasks["pics"]["input"] == {"size": 32, "channels": 3, "encoding": "jpeg"}
    rows = list(prediction.predict_paths(model, files, batch_size=4))
    run = runs_lib.load(run_dir)
    steps = input_pipeline.preprocess(run.task, 8, False, **run.parts.data.normalization)
    stored = [
        example
        for split in ("train", "test")
        for example in sources.open_source("image_folder/pics-size32", split, config.data_dir)
    ]
    assert len(stored) == len(files) == 11
    misses = []
    for path, row in zip(files, rows):
        # Which stored example is this file's: the nearest to its upright centre square (the
        # pictures are far apart), found without the code under test.
        with Image.open(path) as image:
            upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), np.float32)
        side = min(upright.shape[:2])
        top, left = (upright.shape[0] - side) // 2, (upright.shape[1] - side) // 2
        square = Image.fromarray(upright[top : top + side, left : left + side].astype(np.uint8))
        near = np.asarray(square.resize((32, 32), Image.Resampling.BILINEAR), np.float32)
        distances = [np.abs(np.asarray(ex["image"], np.float32) - near).mean() for ex in stored]
        assert sorted(distances)[0] < 3 < sorted(distances)[1], (path, sorted(distances)[:2])
        example = stored[int(np.argmin(distances))]
        logits = model.predict(steps(dict(example), None)["image"][None])["pics"][0]
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert row["pics"]["index"] == int(np.argmax(logits)), path
        np.testing.assert_allclose(row["pics"]["probability"], probabilities.max(), atol=1e-6)
        # What predict did before: the whole stored frame squashed to 8 x 8, no EXIF turn.
        squashed = steps({"image": common.load_rgb(path), "label": 0}, None)["image"]
        old = model.predict(squashed[None])["pics"][0]
        misses.append(np.abs(old - logits).max())
    assert max(misses) > 1e-3  # so the comparison above can fail


def test_exif_rotated_files_predict_as_the_upright_picture(folder_run, ties_folder, tmp_path):
    """A file with an EXIF orientation predicts what the same picture stored upright does, for
    classes and for landmark points, which come back in the upright picture's pixels."""
    pixels = _smooth(np.random.default_rng(1), 30, 55)
    Image.fromarray(pixels).save(tmp_path / "upright.png")
    _exif_rotated(pixels, tmp_path / "tagged.png")
    assert Image.open(tmp_path / "tagged.png").size == (30, 55)  # stored sideways
    paths = [str(tmp_path / "upright.png"), str(tmp_path / "tagged.png")]
    for model in (prediction.open_model(folder_run[2]), model_folder.load(ties_folder)):
        upright, tagged = list(prediction.predict_paths(model, paths))
        for task in model.tasks:
            assert upright[task] == tagged[task], task
    points = np.asarray(upright["digit_box"]["points"])
    # Read without its tag (the stored frame), the same pixels give other points.
    sideways = model.predict_images([np.rot90(pixels)])[0]["digit_box"]["points"]
    assert not np.allclose(points, sideways)
