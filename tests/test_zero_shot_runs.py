"""Zero-shot heads end to end: `config.head.type="zero_shot"` trains a CLIP tower's adapter
under the frozen head of scripts/make_zero_shot_heads.py's file (the golden one of the tiny
CLIPModel, whose task "shapes" holds circle, square and triangle: the classes of
`demo_shapes`), and the run loads, merges and predicts with that head rebuilt from its record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmerge import (
    checkpoint,
    evaluation,
    heads,
    input_pipeline,
    lora,
    model_folder,
    prediction,
    run_config,
    training,
    zero_shot,
)
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import demo_shapes, prepare
from jaxmerge.learned import refit
from jaxmerge.models import clip
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "clip")
FILE = os.path.join(GOLDEN, "zero_shot.npz")


def zero_shot_config(data_dir, **overrides):
    """The tiny golden CLIP tower (width 32, image 16) on the demo shapes, zero-shot head."""
    return tiny_config(
        data_dir,
        task="shapes",
        **{
            "dataset.name": "image_folder/shapes-size32",
            "model.family": "clip",
            "model.variant": "mu/4",
            "model.image_size": 16,
            "model.layer_norm_eps": 1e-5,
            "base.source": "hf",
            "base.path": os.path.join(GOLDEN, "clip_model"),
            "head.type": "zero_shot",
            "head.zero_shot_file": FILE,
            "batch_size": 8,
            "steps": 4,
            "warmup_steps": 1,
            "log_every": 2,
            "checkpoint_every": 2,
            "tensorboard": False,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot")
    demo_shapes.write_folder(str(root / "shapes"), per_class=10)
    data_dir = str(root / "tfds")
    prepare.prepare("image_folder/shapes-size32", data_dir, str(root / "shapes"))
    return root, data_dir


def _command(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_zero_shot_run_trains_loads_merges_and_predicts_with_the_file_head(shapes, tmp_path):
    root, data_dir = shapes
    result = training.train_and_evaluate(zero_shot_config(data_dir), str(tmp_path / "w"))
    run_dir = str(tmp_path / "w" / "adapters" / "shapes")
    run = runs_lib.load(run_dir)

    # The checkpoint's head is the file's, bit for bit; the adapter trained.
    assert isinstance(run.head_def, zero_shot.ZeroShotHead)
    for name, value in zero_shot.head_params(FILE, "shapes").items():
        np.testing.assert_array_equal(run.head[name], value)
    assert np.any(np.asarray(run.adapter["block_0"]["attention"]["query"]["lora_b"]) != 0)
    model_def, base = runs_lib.base_of([run])
    backbone = lora.fold_into_base(base, run.adapter)
    refitted = refit.refit_head(run, model_def, backbone, steps=2, batch_size=8)
    for name, value in run.head.items():  # a head refit leaves a frozen head as it is
        np.testing.assert_array_equal(refitted[name], value)
    _, metadata = checkpoint.load(os.path.join(run_dir, "checkpoints"))
    assert metadata["head"] == {
        **heads.to_record(zero_shot.head_def(FILE, "shapes")), "kind": "classification"
    }  # fmt: skip

    # Same score in this process and in a fresh one that never saw the config.
    here = evaluation.evaluate_runs([run_dir])["shapes"]
    assert here["accuracy"] == result["accuracy"] and here["examples"] == result["examples"]
    script = "import json, sys; from jaxmerge import evaluation; "
    script += "print(json.dumps(evaluation.evaluate_runs([sys.argv[1]])))"
    fresh = _command("-c", script, run_dir, cwd=str(tmp_path))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads(fresh.stdout.splitlines()[-1])["shapes"]["accuracy"] == result["accuracy"]

    # One adapter merged with weight 1 is the run itself: the folder predicts as the run does.
    output = tmp_path / "model"
    merged = _command(
        "-m", "jaxmerge", "merge", "--run", run_dir, "--method=task_arithmetic", "--weights=1",
        f"--output={output}", cwd=str(tmp_path),
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-2000:]
    info = json.loads((output / model_folder.MODEL_FILE).read_text())
    assert info["tasks"]["shapes"]["head"]["type"] == "zero_shot"
    assert info["tasks"]["shapes"]["labels"] == ["circle", "square", "triangle"]
    # The folder records CLIP's pixel normalisation, and prepares images as training did.
    assert info["preprocessing"]["mean"] == list(clip.CLIP_MEAN)
    assert info["preprocessing"]["std"] == list(clip.CLIP_STD)
    image = {"image": np.random.default_rng(1).integers(0, 256, (20, 24, 3), np.uint8), "label": 0}
    trained_on = input_pipeline.preprocess(run.task, 16, False, **run.parts.data.normalization)
    np.testing.assert_array_equal(
        model_folder.preprocess_fn(info["preprocessing"])(dict(image), None)["image"],
        trained_on(dict(image), None)["image"],
    )
    folder = model_folder.load(str(output))
    for name, value in zero_shot.head_params(FILE, "shapes").items():
        np.testing.assert_array_equal(folder.head_params["shapes"][name], value)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        folder.predict(images)["shapes"],
        model_folder.from_run(run_dir).predict(images)["shapes"],
        rtol=1e-5,
        atol=1e-5,
    )
    paths = sorted(str(p) for p in (root / "shapes" / "square").glob("*.jpg"))[:3]
    rows = list(prediction.predict_paths(prediction.open_model(str(output)), paths, batch_size=4))
    assert [r["path"] for r in rows] == paths
    assert all(r["shapes"]["label"] in demo_shapes.CLASSES for r in rows)


def test_zero_shot_file_errors_name_the_field_value_and_what_is_allowed(tmp_path):
    def error(**overrides):
        config = tiny_config(tmp_path, **{"head.type": "zero_shot", **overrides})
        with pytest.raises(ValueError) as caught:
            run_config.resolve(config)
        return str(caught.value)

    missing = str(tmp_path / "none.npz")
    assert error(**{"head.zero_shot_file": missing}) == (
        f"config.head.zero_shot_file: got {missing!r}; allowed: an existing file of "
        f"`python -m jaxmerge zero_shot_heads`"
    )
    assert error(**{"head.zero_shot_file": FILE}) == (
        f"config.head.zero_shot_file: got {FILE!r}; allowed: a file holding task 'digits' "
        f"(it holds ['pets', 'shapes'])"
    )
    with np.load(FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    wrong = str(tmp_path / "digits3.npz")
    np.savez(wrong, **arrays, **{"digits/classes": arrays["shapes/classes"]})
    assert error(**{"head.zero_shot_file": wrong}) == (
        f"config.head.zero_shot_file: got {wrong!r}; allowed: a file with 10 classes for task "
        f"'digits' (it has 3)"
    )
    assert error(task="digits_value", **{"head.zero_shot_file": FILE}).startswith(
        "config.head.type: got 'zero_shot'; allowed: 'mlp' for task 'digits_value' (regression)"
    )
    assert error(**{"head.type": "linear"}) == (
        "config.head.type: got 'linear'; allowed: ('mlp', 'zero_shot')"
    )


def test_head_records_round_trip_and_old_records_are_mlp_heads():
    mlp = heads.MlpHead(16, 10)
    shot = zero_shot.head_def(FILE, "shapes")
    assert heads.from_record(heads.to_record(mlp)) == mlp
    rebuilt = heads.from_record(json.loads(json.dumps(heads.to_record(shot))))
    assert (rebuilt.outputs, rebuilt.width, rebuilt.projection_dim) == (3, 32, 24)
    # Run metadata and model.json entries written before head types: {hidden, outputs, kind}.
    old = {"hidden": 16, "outputs": 10, "kind": "classification"}
    assert heads.from_record(old) == mlp
    pooled = np.ones((2, 32), np.float32)
    params = shot.init(jax.random.key(0), pooled)["params"]
    np.testing.assert_array_equal(
        rebuilt.apply({"params": params}, pooled), shot.apply({"params": params}, pooled)
    )


def test_a_zero_shot_file_for_another_width_is_refused_when_the_base_loads(tmp_path):
    with np.load(FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    path = str(tmp_path / "digits.npz")
    np.savez(path, **arrays, **{"digits/classes": np.eye(10, 24, dtype=np.float32)})
    config = tiny_config(tmp_path, **{"head.type": "zero_shot", "head.zero_shot_file": path})
    parts = run_config.resolve(config)  # the file fits the task: width is checked at build
    with pytest.raises(ValueError, match=r"reads a 32-wide feature; allowed: a file made for "):
        heads.build(parts.head, parts.task, width=64)


def test_clip_suite_config_takes_zero_shot_heads():
    from experiments.configs import clip as clip_config

    assert clip_config.get_config("base=random").train.head.type == "mlp"  # linear heads
    config = clip_config.get_config("path=~/clip,heads=zero_shot")
    assert config.train.head.type == "zero_shot"
    assert config.train.head.zero_shot_file == os.path.join("~/clip", "zero_shot.npz")
    config = clip_config.get_config(f"base=random,heads=zero_shot,zero_shot_file={FILE}")
    run = config.train.copy_and_resolve_references()
    run.task = "sun397"
    with pytest.raises(ValueError, match=r"allowed: a file holding task 'sun397' \(it holds"):
        run_config.resolve(run)
    with pytest.raises(ValueError, match=r"clip.py: heads='mlp'; allowed: linear, zero_shot"):
        clip_config.get_config("heads=mlp")
    with pytest.raises(ValueError, match="zero_shot_file is read with heads=zero_shot only"):
        clip_config.get_config(f"zero_shot_file={FILE}")
