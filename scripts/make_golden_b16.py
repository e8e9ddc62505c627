"""Writes tests/golden/b16/: reference outputs of a full-size ViT-B/16 (PyTorch transformers and
PEFT) for the real-size checkpoint tests (tests/test_b16_checkpoints.py).

Run from the repository root in a virtualenv with torch, transformers and peft (no jax needed):

    /work/torch_venv/bin/python scripts/make_golden_b16.py

The weights are never committed: `tests/b16_weights.py` draws them from a seed (numpy only) and
writes them as a Hugging Face folder at the config of google/vit-base-patch16-224-in21k with
its real key names; this script writes that folder to a temporary directory and loads it with
`from_pretrained` (which must find every key: missing or unexpected keys fail here), so the
test rebuilds the same checkpoint bit for bit without torch. Written (about 350 KB):

  outputs.npz              float32, for the seeded images `b16_weights.images(2)` (NHWC,
                           given to torch as NCHW):
    model/cls_token          (2, 768)  ViTModel last_hidden_state[:, 0]
    model/mean_token         (2, 768)  last_hidden_state.mean(1)
    model/pooler_output      (2, 768)
    classifier/logits        (2, 5)    ViTForImageClassification (seed 1)
    peft/logits              (2, 5)    the classifier with the adapter below active
    peft/folded_logits       (2, 5)    after merge_and_unload()
  peft_adapter/            a PEFT LoRA adapter (r=2, lora_alpha=4, query and value of all 12
                           layers) trained for 3 Adam steps on the classifier from PEFT's own
                           initialisation (torch seed 0), so lora_B is not zero; save_pretrained
                           format (adapter_config.json, adapter_model.safetensors, ~300 KB).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import b16_weights  # noqa: E402

OUT = os.path.join(ROOT, "tests", "golden", "b16")
WHERE = "tests/b16_weights.py: write_hf(folder, 'ViTForImageClassification', seed=1)"


def load(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "mismatched_keys"} | {
        "mismatched_keys": info.get("mismatched_keys")
    }
    if any(bad.values()):
        raise SystemExit(f"{cls.__name__}: loading info {bad}")
    return model.eval()


def main():
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification, ViTModel

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    pixels = torch.from_numpy(b16_weights.images(2).transpose(0, 3, 1, 2).copy())
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = b16_weights.write_hf(os.path.join(tmp, "model"), "ViTModel", seed=0)
        model = load(ViTModel, folder)
        with torch.no_grad():
            out = model(pixel_values=pixels)
        tokens = out.last_hidden_state.numpy()
        outputs["model/cls_token"] = tokens[:, 0]
        outputs["model/mean_token"] = tokens.mean(1)
        outputs["model/pooler_output"] = out.pooler_output.numpy()
        print("ViTModel", tokens.shape, float(np.abs(tokens).mean()))

        folder = b16_weights.write_hf(os.path.join(tmp, "cls"), "ViTForImageClassification", 1)
        classifier = load(ViTForImageClassification, folder)
        with torch.no_grad():
            outputs["classifier/logits"] = classifier(pixel_values=pixels).logits.numpy()

    torch.manual_seed(0)
    # transformers 5.x names query and value q_proj and v_proj; PEFT saves those names.
    names = {n.rsplit(".", 1)[-1] for n, _ in classifier.named_modules()}
    targets = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]
    peft_model = get_peft_model(classifier, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 3])
    peft_model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(peft_model(pixel_values=pixels).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print("peft step loss", float(loss.detach()))
    peft_model.eval()
    peft_model.save_pretrained(os.path.join(OUT, "peft_adapter"))
    adapter = os.path.join(OUT, "peft_adapter")
    os.remove(os.path.join(adapter, "README.md"))  # PEFT's model card template
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = WHERE  # not the temporary folder it was trained in
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with torch.no_grad():
        outputs["peft/logits"] = peft_model(pixel_values=pixels).logits.numpy()
        folded = peft_model.merge_and_unload()
        outputs["peft/folded_logits"] = folded(pixel_values=pixels).logits.numpy()
    np.savez(
        os.path.join(OUT, "outputs.npz"), **{k: v.astype(np.float32) for k, v in outputs.items()}
    )
    for name in sorted(os.listdir(OUT)):
        print(name)


if __name__ == "__main__":
    main()
