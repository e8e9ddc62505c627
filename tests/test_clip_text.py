"""CLIP's text tower and the zero-shot heads file in JAX: parity with transformers on the golden
files of scripts/make_golden_clip.py (`text_outputs.npz`; `zero_shot.npz`, written by the torch
reference scripts/make_zero_shot_heads.py), and the command's one-line errors.

Tolerances are relative to the largest reference value; float32 on both sides gives ~1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import golden_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_files import rel_err

from jaxmerge import text_heads, zero_shot
from jaxmerge.interop import files
from jaxmerge.models import clip_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "clip")
MODEL = os.path.join(GOLDEN, "clip_model")
TOL = 1e-5


def text_golden() -> dict[str, np.ndarray]:
    return golden_files.arrays("clip", "text_outputs.npz")


def load_text():
    kwargs, params, extras = clip_text.load_hf(MODEL)
    return clip_text.TextTower(**kwargs), params, extras


def test_tokenizer_matches_transformers():
    want = text_golden()
    ids, mask = text_heads.tokenize(
        text_heads.load_tokenizer(MODEL), [str(p) for p in want["prompts"]]
    )
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (mask == 0).any()  # the prompts differ in length: padding is exercised


@pytest.mark.parametrize("eos", ("config", "legacy"))
def test_text_tower_matches_transformers(eos):
    model, params, _ = load_text()
    want = text_golden()
    if eos == "legacy":  # eos_token_id 2: transformers pools at the largest token id
        model = model.clone(eos_token_id=clip_text.LEGACY_EOS_TOKEN_ID)
    out = model.apply({"params": params}, want["input_ids"], want["attention_mask"])
    if eos == "legacy":
        assert rel_err(out["pooled"], want["legacy_eos/pooler_output"]) < TOL
        assert rel_err(out["pooled"], want["pooler_output"]) > 0.1  # the two rules differ here
        return
    assert rel_err(out["tokens"], want["last_hidden_state"]) < TOL  # padding positions too
    assert rel_err(out["pooled"], want["pooler_output"]) < TOL
    assert rel_err(out["text_embeds"], want["text_embeds"]) < TOL


@pytest.mark.parametrize("eos_token_id", (1, clip_text.LEGACY_EOS_TOKEN_ID))
def test_extra_padding_changes_no_text_embedding(eos_token_id):
    model, params, _ = load_text()
    model = model.clone(eos_token_id=eos_token_id)
    ids, mask = text_golden()["input_ids"], text_golden()["attention_mask"]
    longer = text_heads.pad_length(ids, mask, model.max_length)
    assert longer[0].shape == (len(ids), model.max_length)
    want = model.apply({"params": params}, ids, mask)["text_embeds"]
    got = model.apply({"params": params}, *longer)["text_embeds"]
    assert rel_err(got, want) < 1e-6


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_attention_is_causal():
    model = clip_text.TextTower(
        vocab_size=50, max_length=8, width=16, depth=2, mlp_dim=32, num_heads=2, projection_dim=8
    )
    params = clip_text.init_params(model, jax.random.key(0))
    ids = jnp.asarray([[0, 5, 9, 13, 1, 1]])
    changed = ids.at[0, 3].set(40)
    before = model.apply({"params": params}, ids)["tokens"]
    after = model.apply({"params": params}, changed)["tokens"]
    np.testing.assert_array_equal(before[:, :3], after[:, :3])
    assert not np.allclose(before[:, 3:], after[:, 3:])


def test_text_loader_reads_logit_scale_and_visual_projection():
    model, _, extras = load_text()
    state = files.read_safetensors(MODEL)
    np.testing.assert_array_equal(extras["visual_projection"], state["visual_projection.weight"].T)
    assert extras["logit_scale"] == np.float32(state["logit_scale"])
    assert (model.width, model.depth, model.projection_dim, model.eos_token_id) == (32, 1, 24, 1)


def test_heads_file_matches_the_torch_reference():
    """`zero_shot.npz` was written by torch and transformers for the tasks and template of
    make_golden_clip.py (`ZERO_SHOT`, `ZERO_SHOT_TEMPLATE`); the file records both."""
    want = golden_files.arrays("clip", "zero_shot.npz")
    tasks = sorted(k.removesuffix("/classes") for k in want if k.endswith("/classes"))
    assert tasks == ["pets", "shapes"]
    classes = {t: [str(n) for n in want[f"{t}/class_names"]] for t in tasks}
    templates = {t: tuple(str(s) for s in want[f"templates/{t}"]) for t in tasks}
    got = text_heads.zero_shot_arrays(MODEL, classes, templates)
    assert sorted(got) == sorted(k for k in want if k != "model")
    for key, value in want.items():
        if key == "model":
            continue
        assert got[key].shape == value.shape, key
        if value.dtype.kind == "f":
            assert got[key].dtype == np.float32
            assert rel_err(got[key], value) < TOL, key
        else:
            np.testing.assert_array_equal(got[key], value)


def test_command_writes_a_file_load_heads_reads_and_never_overwrites_it(tmp_path):
    output = str(tmp_path / "heads" / "zero_shot.npz")
    # MNIST's class names come from its TFDS builder's code: an empty data_dir will do.
    classes = text_heads.write_heads(MODEL, output, ["mnist"], str(tmp_path))
    assert classes == {"mnist": [str(d) for d in range(10)]}
    heads = zero_shot.load_heads(output)
    assert heads["classes"]["mnist"].shape == (10, 24)
    np.testing.assert_allclose(np.linalg.norm(heads["classes"]["mnist"], axis=1), 1, rtol=1e-6)
    assert heads["class_names"]["mnist"] == classes["mnist"]
    assert heads["visual_projection"].shape == (32, 24)
    assert zero_shot.head_def(output, "mnist").outputs == 10
    with np.load(output) as npz:
        assert list(npz["templates/mnist"]) == list(text_heads.task_prompts.TEMPLATES["mnist"])
        assert str(npz["model"]) == os.path.abspath(MODEL)
    written = open(output, "rb").read()
    with pytest.raises(ValueError, match=rf"--output: '{output}' exists; refusing to overwrite"):
        text_heads.write_heads(MODEL, output, ["mnist"], str(tmp_path))
    assert open(output, "rb").read() == written


def test_a_prompt_longer_than_the_tower_is_refused_before_it_runs(tmp_path, monkeypatch):
    def computed(*args, **kwargs):
        raise AssertionError("the text tower ran")

    monkeypatch.setattr(text_heads, "class_embeddings", computed)
    output = tmp_path / "out.npz"
    message = (
        r"task 'eurosat': prompt 'a centered satellite photo of annual crop land.': 42 tokens; "
        r"allowed: at most 32"
    )  # the tiny tokenizer has one token per character
    with pytest.raises(ValueError, match=message):
        text_heads.write_heads(MODEL, str(output), ["mnist", "eurosat"], str(tmp_path))
    assert not output.exists()


def _folder_without(tmp_path, name):
    folder = tmp_path / f"without_{name}"
    shutil.copytree(MODEL, folder)
    os.remove(folder / name)
    return str(folder)


def _folder_without_text_weights(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "vision_only"
    shutil.copytree(MODEL, folder)
    state = files.read_safetensors(MODEL)
    save_file(
        {k: v for k, v in state.items() if not k.startswith("text_")},
        str(folder / "model.safetensors"),
    )
    return str(folder)


def _folder_with_broken_config(tmp) -> str:
    folder = tmp / "broken"
    shutil.copytree(MODEL, folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # a half-written file
    return str(folder)


BAD_INPUTS = {
    "missing folder": (
        lambda tmp: dict(model=str(tmp / "nowhere")),
        r"--model: '.*nowhere' is not a folder; allowed: a Hugging Face CLIPModel folder",
    ),
    "no tokenizer.json": (
        lambda tmp: dict(model=_folder_without(tmp, "tokenizer.json")),
        r"--model: '.*without_tokenizer.json' has no tokenizer.json; allowed: a Hugging Face",
    ),
    "no safetensors": (
        lambda tmp: dict(model=_folder_without(tmp, "model.safetensors")),
        r"--model: '.*' has no model.safetensors; allowed: a Hugging Face CLIPModel folder",
    ),
    "vision model": (
        lambda tmp: dict(model=os.path.join(GOLDEN, "clip_vision")),
        r"--model: '.*clip_vision' is a 'clip_vision_model' model, without a text tower",
    ),
    "no text weights": (
        lambda tmp: dict(model=_folder_without_text_weights(tmp)),
        r"--model: '.*vision_only' has no text tower weights \(no 'text_model\.\*' tensors",
    ),
    "broken config.json": (
        lambda tmp: dict(model=_folder_with_broken_config(tmp)),
        r"--model: '.*broken/config.json' is not valid JSON \(.* line \d+ .*\); allowed: a Hugg",
    ),
    "unknown task": (
        lambda tmp: dict(task_names=["eurosat", "imagenet"]),
        r"--tasks: unknown task 'imagenet'; allowed: \[.*'eurosat'.*\]",
    ),
    "no data_dir": (
        lambda tmp: dict(task_names=["mnist"], data_dir=str(tmp / "no_tfds")),
        r"--data_dir: '.*no_tfds' is not a folder; allowed: the TFDS data folder where mnist",
    ),
    "not npz": (
        lambda tmp: dict(output=str(tmp / "heads.txt")),
        r"--output: '.*heads.txt'; allowed: a path ending in .npz",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_before_any_compute(case, tmp_path, monkeypatch):
    def computed(*args, **kwargs):
        raise AssertionError("computed before the inputs were checked")

    monkeypatch.setattr(text_heads, "zero_shot_arrays", computed)
    monkeypatch.setattr(text_heads.task_prompts, "suite_classes", computed)
    make, message = BAD_INPUTS[case]
    inputs = dict(model=MODEL, output=str(tmp_path / "out.npz"), task_names=["eurosat"])
    inputs.update(make(tmp_path))
    with pytest.raises(ValueError, match=message):
        text_heads.write_heads(**inputs)
    assert not os.path.exists(tmp_path / "out.npz")


def test_command_error_is_one_line(tmp_path):
    command = [sys.executable, "-m", "jaxmerge", "zero_shot_heads", "--model", str(tmp_path / "x"),
               "--output", str(tmp_path / "out.npz")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model: '{tmp_path / 'x'}'"), lines


def test_tokenizer_config_sets_padding(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    with open(folder / "tokenizer_config.json") as f:
        settings = json.load(f)
    settings.update(pad_token="!", padding_side="left")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(settings, f)
    ids, mask = text_heads.tokenize(text_heads.load_tokenizer(str(folder)), ["a b", "a"])
    assert ids[1, 0] == 2 and mask[1, 0] == 0 and mask[0].all()  # "!" is id 2, on the left
