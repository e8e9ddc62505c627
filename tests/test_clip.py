"""CLIP and SigLIP image towers: parity with transformers on scripts/make_golden_clip.py's files,
and the LoRA invariants every family keeps.

Tolerances are relative to the largest reference value; float32 on both sides gives ~1e-6.
"""

from __future__ import annotations

import json
import os
import shutil

import golden_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_files import rel_err

from jaxmerge import lora, merging, models
from jaxmerge.interop import clip as clip_io
from jaxmerge.interop import peft as peft_io
from jaxmerge.models import clip

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "clip")
TOL = 1e-5


def golden() -> dict[str, np.ndarray]:
    return golden_files.arrays("clip")


def run(kwargs, variables):
    return clip.VisionTower(**kwargs).apply(variables, golden()["images"])


@pytest.mark.parametrize("folder", ("clip_vision", "clip_vision_proj", "clip_model"))
def test_hf_clip_matches_transformers(folder):
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, folder))
    assert kwargs["activation"] == "quick_gelu" and kwargs["pre_norm"]
    out = run(kwargs, {"params": params})
    if folder == "clip_model":  # another random draw: its reference is the zero-shot logits
        assert kwargs["projection_dim"] == 24 and out["image_embeds"].shape == (2, 24)
        return
    assert rel_err(out["tokens"], golden()["clip/last_hidden_state"]) < TOL
    if folder == "clip_vision":
        assert kwargs["projection_dim"] == 0 and "image_embeds" not in out
        assert rel_err(out["pooled"], golden()["clip/pooler_output"]) < TOL
    else:
        assert rel_err(out["image_embeds"], golden()["clip_proj/image_embeds"]) < TOL


def test_position_id_buffers_of_older_checkpoints_are_not_parameters(tmp_path):
    """transformers < 4.31 saved `embeddings.position_ids` (an index buffer) in both towers;
    openai's CLIP folders on the Hub hold them. They load as if absent."""
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(GOLDEN, "clip_model", "model.safetensors"))
    for tower, length in (("vision_model", 17), ("text_model", 32)):
        state[f"{tower}.embeddings.position_ids"] = np.arange(length, dtype=np.int64)[None]
    shutil.copytree(os.path.join(GOLDEN, "clip_model"), tmp_path / "old")
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    _, params, _ = clip.load_hf(str(tmp_path / "old"))
    _, want, _ = clip.load_hf(os.path.join(GOLDEN, "clip_model"))
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_siglip_npz_matches_transformers():
    kwargs, params, _ = clip.load_siglip_npz(os.path.join(GOLDEN, "siglip.npz"))
    assert kwargs["pool"] == "map" and kwargs["image_size"] == 16
    out = run(kwargs, {"params": params})
    assert rel_err(out["tokens"], golden()["siglip/last_hidden_state"]) < TOL
    assert rel_err(out["pooled"], golden()["siglip/pooler_output"]) < TOL


def test_siglip_hf_folder_matches_the_npz():
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, "siglip_vision"))
    npz_kwargs, npz_params, _ = clip.load_siglip_npz(os.path.join(GOLDEN, "siglip.npz"))
    assert kwargs == npz_kwargs
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(npz_params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_peft_adapter_on_clip_matches_peft():
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, "clip_vision"))
    adapter, _, _ = peft_io.load_peft_adapter(os.path.join(GOLDEN, "peft_qv"), names=clip.HF_NAMES)
    assert set(lora.ranks(adapter)) == {
        f"block_{i}/attention/{n}" for i in (0, 1) for n in ("query", "value")
    }
    out = run(kwargs, {"params": params, "lora": adapter})
    assert rel_err(out["tokens"], golden()["peft/last_hidden_state"]) < TOL
    assert rel_err(out["pooled"], golden()["peft/pooler_output"]) < TOL
    # Otherwise the check could not tell a lost adapter from a correct one.
    assert rel_err(golden()["peft/pooler_output"], golden()["clip/pooler_output"]) > 0.05
    folded = run(kwargs, {"params": lora.fold_into_base(params, adapter)})
    assert rel_err(folded["pooled"], golden()["peft/pooler_output"]) < TOL


def test_a_clip_adapter_exported_to_peft_loads_in_peft_to_the_same_outputs(tmp_path):
    """scripts/make_golden_clip_export.py: `model_folder.export_peft` of a CLIP adapter (every
    linear layer, rank and alpha patterns), loaded by `PeftModel.from_pretrained` on
    `clip_vision`, gave `peft/*`. The export writes that folder again (module names by CLIP's
    `NameMap`, not the ViT's), and the adapter it holds gives PEFT's outputs."""
    from safetensors.numpy import load_file

    from jaxmerge import model_folder

    want = golden_files.arrays("clip", "export_outputs.npz")
    adapter: dict = {}
    for key, value in want.items():
        if not key.startswith("peft/"):
            adapter = lora.set_at(adapter, key, jnp.asarray(value))
    info = {"folded": False, "merge": {"method": "cat"}, "model": {"family": "clip"}, "base": {}}
    model = model_folder.MultiTaskModel(None, None, {}, {}, {}, info, adapter, None)
    folder = model_folder.export_peft(model, str(tmp_path / "peft"))
    golden_folder = os.path.join(GOLDEN, "exported_peft")
    got, expected = (
        load_file(os.path.join(f, "adapter_model.safetensors")) for f in (folder, golden_folder)
    )
    assert sorted(got) == sorted(expected)
    assert all(name.startswith("base_model.model.encoder.layers.") for name in got)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])
    configs = []
    for f in (folder, golden_folder):
        with open(os.path.join(f, "adapter_config.json")) as file:
            configs.append({**json.load(file), "base_model_name_or_path": None})  # the script's
    assert configs[0] == configs[1] and configs[0]["rank_pattern"] and configs[0]["alpha_pattern"]
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, "clip_vision"))
    read_back, _, _ = peft_io.load_peft_adapter(folder, names=clip.HF_NAMES)
    out = run(kwargs, {"params": params, "lora": read_back})
    assert rel_err(out["tokens"], want["peft/last_hidden_state"]) < TOL
    assert rel_err(out["pooled"], want["peft/pooler_output"]) < TOL
    assert rel_err(want["peft/pooler_output"], golden()["clip/pooler_output"]) > 0.05


def test_siglip_npz_resamples_and_scanned_layout(tmp_path):
    with np.load(os.path.join(GOLDEN, "siglip.npz")) as npz:
        flat = {k: npz[k] for k in npz.files}
    blocks = sorted({k.split("/")[3] for k in flat if "/encoderblock_" in k})
    scanned = {k: v for k, v in flat.items() if "/encoderblock_" not in k}
    rests = {k.split("/", 4)[4] for k in flat if "/encoderblock_" in k}
    for rest in rests:
        stacked = [flat[f"params/img/Transformer/{b}/{rest}"] for b in blocks]
        scanned[f"params/img/Transformer/encoderblock/{rest}"] = np.stack(stacked)
    path = tmp_path / "scanned.npz"
    np.savez(path, **scanned)
    kwargs, params, _ = clip.load_siglip_npz(str(path))
    out = run(kwargs, {"params": params})
    assert rel_err(out["pooled"], golden()["siglip/pooler_output"]) < TOL
    kwargs, params, _ = clip.load_siglip_npz(str(path), image_size=24)
    assert params["pos_embedding"].shape == (1, 36, 32)


@pytest.mark.parametrize(
    "family",
    ["clip", pytest.param("siglip", marks=pytest.mark.slow)],  # slow: CI's own step (suite time)
)
def test_lora_invariants_on_the_towers(family):
    """A zero adapter changes nothing; `cat` merging of two adapters equals their sum folded."""
    spec = models.get(family)
    model = spec.module(**spec.variant("mu/4", image_size=8))
    base = spec.init_params(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    config = lora.LoraConfig(rank=2, targets=models.get(family).target_regex("all"))
    zero = lora.init_adapter(jax.random.key(2), base, config)
    assert all(p.startswith("block_") for p in lora.ranks(zero))  # never the MAP head
    plain = model.apply({"params": base}, images)["pooled"]
    np.testing.assert_allclose(model.apply({"params": base, "lora": zero}, images)["pooled"], plain)
    adapters = [
        lora.map_targets(lambda n, i=i: {**n, "lora_b": n["lora_b"] + 0.1 * (i + 1)}, zero)
        for i in range(2)
    ]
    merged = merging.merge(adapters, "cat", [1.0, 1.0])
    via_merge = model.apply({"params": lora.fold_into_base(base, merged)}, images)["pooled"]
    folded = base
    for adapter in adapters:
        folded = lora.fold_into_base(folded, adapter)
    np.testing.assert_allclose(
        via_merge, model.apply({"params": folded}, images)["pooled"], rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(via_merge, plain, atol=1e-3)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_jit_and_eager_agree_with_bfloat16_close():
    spec = models.get("clip")
    model = spec.module(**spec.variant("mu/4", image_size=8))
    base = spec.init_params(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    eager = model.apply({"params": base}, images)
    jitted = jax.jit(model.apply)({"params": base}, images)
    np.testing.assert_allclose(eager["pooled"], jitted["pooled"], rtol=1e-5, atol=1e-6)
    low = spec.module(**spec.variant("mu/4", image_size=8), dtype=jnp.bfloat16)
    out = low.apply({"params": base}, images)
    assert out["pooled"].dtype == jnp.float32
    assert rel_err(out["pooled"], eager["pooled"]) < 0.05


def test_bad_inputs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP variant 'B'"):
        clip.clip_variant("B")
    with pytest.raises(ValueError, match="missing file"):
        clip.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="model_type='vit'"):
        clip_io.hf_tower_kwargs({"model_type": "vit"})
    with pytest.raises(ValueError, match="no MAPHead_0/probe"):
        np.savez(tmp_path / "vit.npz", **{"embedding/kernel": np.zeros((4, 4, 3, 8))})
        clip.load_siglip_npz(str(tmp_path / "vit.npz"))
    kwargs, params, _ = clip.load_hf(os.path.join(GOLDEN, "clip_vision"))
    params = jax.tree.map(np.asarray, params)
    params["block_0"]["mlp"]["fc1"]["kernel"] = np.zeros((32, 65), np.float32)
    with pytest.raises(ValueError, match=r"'block_0/mlp/fc1/kernel' has shape \(32, 65\)"):
        clip.check_params(kwargs, params, "test")
