"""Writes tests/golden/mixed_batch.npz: PEFT's mixed-adapter batches on the golden tiny ViT.

Run from the repository root, in a throwaway virtualenv with torch, transformers 5.x and peft
(no jax needed), after scripts/make_golden.py has written tests/golden/hf_vit and adapters/:

    python3 -m venv /work/venv-fusion
    /work/venv-fusion/bin/pip install torch==2.13.0 transformers peft
    /work/venv-fusion/bin/python scripts/make_golden_mixed.py

It loads five of the golden PEFT adapters into one `PeftModel` (a, b: rank 4 on q and v;
rank8; rslora; patterns: all six linear layers with rank and alpha patterns, so adapters
differ in targets, ranks and scales) and runs one forward with PEFT's `adapter_names`, one name
per example ("__base__": the base alone). Arrays, float32 unless noted:

    images              (8, 16, 16, 3) NHWC, seeded (HF gets NCHW)
    adapter_names       (8,) str, the adapter of each example
    last_hidden_state   (8, 17, 32) the mixed batch's jaxmerge `tokens`
    pooler_output       (8, 32)     its `pooled`
"""

from __future__ import annotations

import os

import numpy as np
import torch

GOLDEN = os.path.join("tests", "golden")
ADAPTERS = ("a", "b", "rank8", "rslora", "patterns")
# Every adapter once, the base twice, and one adapter again, in an order with no runs.
NAMES = ("patterns", "a", "__base__", "rank8", "b", "rslora", "a", "__base__")


def main() -> None:
    from peft import PeftModel
    from transformers import ViTModel

    base = ViTModel.from_pretrained(os.path.join(GOLDEN, "hf_vit")).eval()
    folder = lambda name: os.path.join(GOLDEN, "adapters", name)  # noqa: E731
    model = PeftModel.from_pretrained(base, folder(ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(folder(name), adapter_name=name)
    model.eval()

    rng = np.random.default_rng(21)
    images = rng.standard_normal((len(NAMES), 16, 16, 3)).astype(np.float32)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(pixel_values=pixels, adapter_names=list(NAMES))
    arrays = {
        "images": images,
        "adapter_names": np.array(NAMES),
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
    }
    # The same examples one adapter at a time: PEFT's mixed batch must equal them (a check of
    # the reference itself, so the golden file cannot hold a PEFT bug silently).
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                single = model(pixel_values=pixels[i : i + 1]).last_hidden_state
        else:
            model.set_adapter(name)
            with torch.no_grad():
                single = model(pixel_values=pixels[i : i + 1]).last_hidden_state
        error = float((single[0] - out.last_hidden_state[i]).abs().max())
        assert error < 1e-5, (i, name, error)
    path = os.path.join(GOLDEN, "mixed_batch.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {sorted(arrays)}; single-adapter check passed")


if __name__ == "__main__":
    main()
