"""Writes the golden files of a CLIP adapter exported to PEFT (tests/test_clip.py checks them).

Run from the repository root, in two steps: jaxmerge's export in the project's environment,
then PEFT in a throwaway virtualenv with torch, transformers and peft (no jaxmerge there):

    PYTHONPATH=$PWD /work/venv/bin/python scripts/make_golden_clip_export.py export
    python3 -m venv /work/venv-family
    /work/venv-family/bin/pip install torch==2.13.0 transformers peft safetensors
    /work/venv-family/bin/python scripts/make_golden_clip_export.py peft

It needs tests/golden/clip/ from scripts/make_golden_clip.py (`clip_vision`, `outputs.npz`'s
images) and changes nothing there. Seeded; it writes, under tests/golden/clip/:

  exported_peft/        jaxmerge's `model_folder.export_peft` of a CLIP adapter (every linear
                        layer of both blocks; rank 2, 3 in block_1; alpha 4, 6 on the MLP, so
                        the export needs rank_pattern and alpha_pattern), the folder
                        `PeftModel.from_pretrained` then loads on `clip_vision`.
  export_outputs.npz    float32: the adapter's factors, `<path>/lora_a` (in, r), `<path>/lora_b`
                        (r, out) and `<path>/scale` (), and PEFT's outputs on outputs.npz's
                        images: peft/last_hidden_state, peft/pooler_output.

The first step writes the folder and the factors, the second adds PEFT's outputs. The second
checks that PEFT loaded every factor (its LoRA weights equal the file's) and that
the adapter changes the tower's outputs, so a folder PEFT silently ignores fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join("tests", "golden", "clip")


def seeded_adapter(base: dict) -> dict:
    """The adapter: factors from numpy's default_rng(7), ranks and scales as the docstring."""
    from jaxmerge import lora
    from jaxmerge.models import clip

    config = lora.LoraConfig(
        rank=2,
        alpha=4.0,
        targets=clip.TARGET_PRESETS["all"],
        rank_pattern={"block_1": 3},
        alpha_pattern={"mlp": 6.0},
    )
    adapter = lora.init_adapter(__import__("jax").random.key(0), base, config)
    rng = np.random.default_rng(7)
    return lora.map_targets(
        lambda node: {
            "lora_a": rng.normal(0, 0.3, node["lora_a"].shape).astype(np.float32),
            "lora_b": rng.normal(0, 0.3, node["lora_b"].shape).astype(np.float32),
            "scale": np.asarray(node["scale"], np.float32),
        },
        adapter,
    )


def export(adapter: dict, folder: str) -> None:
    """jaxmerge's export of `adapter` as a CLIP model folder's merged adapter would be."""
    from jaxmerge import model_folder

    info = {
        "folded": False,
        "merge": {"method": "cat"},
        "model": {"family": "clip"},
        "base": {"source": "hf", "path": os.path.join(GOLDEN, "clip_vision")},
    }
    model = model_folder.MultiTaskModel(None, None, {}, {}, {}, info, adapter, None)
    model_folder.export_peft(model, folder)


def main_export():
    from jaxmerge import lora
    from jaxmerge.models import clip

    os.chdir(ROOT)
    _, base, _ = clip.load_hf(os.path.join(GOLDEN, "clip_vision"))
    adapter = seeded_adapter(base)
    folder = os.path.join(GOLDEN, "exported_peft")
    shutil.rmtree(folder, ignore_errors=True)
    export(adapter, folder)
    arrays = {
        f"{path}/{key}": np.asarray(value, np.float32)
        for path, node in lora.target_items(adapter)
        for key, value in node.items()
    }
    np.savez(os.path.join(GOLDEN, "export_outputs.npz"), **arrays)
    print(f"wrote {folder} and the factors; now run the 'peft' step in the torch virtualenv")


def main_peft():
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import CLIPVisionModel

    os.chdir(ROOT)
    folder = os.path.join(GOLDEN, "exported_peft")
    with np.load(os.path.join(GOLDEN, "outputs.npz")) as npz:
        images = npz["images"]
    with np.load(os.path.join(GOLDEN, "export_outputs.npz")) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith("peft/")}
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    tower = CLIPVisionModel.from_pretrained(os.path.join(GOLDEN, "clip_vision")).eval()
    with torch.no_grad():
        plain = tower(pixel_values=pixels).last_hidden_state.numpy()
    model = PeftModel.from_pretrained(tower, folder).eval()
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    loaded = {
        "base_model.model." + name.removeprefix("base_model.model.").replace(".default", ""): p
        for name, p in ((n, p.detach().numpy()) for n, p in model.named_parameters())
        if "lora_" in name
    }
    assert sorted(saved) == sorted(loaded), (sorted(saved)[:3], sorted(loaded)[:3])
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert np.abs(out.last_hidden_state.numpy() - plain).max() > 0.1, "the adapter did nothing"
    arrays["peft/last_hidden_state"] = out.last_hidden_state.numpy()
    arrays["peft/pooler_output"] = out.pooler_output.numpy()
    np.savez(os.path.join(GOLDEN, "export_outputs.npz"), **arrays)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    print(f"PEFT loaded {len(saved)} tensors of {folder} (r={config['r']}, "
          f"rank_pattern {config['rank_pattern']}); wrote its outputs")  # fmt: skip


if __name__ == "__main__":
    steps = {"export": main_export, "peft": main_peft}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        sys.exit(f"usage: {sys.argv[0]} export|peft")
    steps[sys.argv[1]]()
