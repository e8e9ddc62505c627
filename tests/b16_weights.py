"""Seeded random weights for a ViT-B/16 at the config of google/vit-base-patch16-224-in21k, as
Hugging Face state dicts with the real key names, written as real checkpoint folders.

numpy and safetensors only: the test suite writes these checkpoints at test time, and
scripts/make_golden_b16.py (in a torch venv) rebuilds the same weights to produce the reference
outputs committed in tests/golden/b16/. Weights are never committed.
"""

from __future__ import annotations

import json
import os

import numpy as np

# config.json of google/vit-base-patch16-224-in21k (transformers' ViTConfig fields).
HF_CONFIG = {
    "architectures": ["ViTModel"],
    "attention_probs_dropout_prob": 0.0,
    "encoder_stride": 16,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "qkv_bias": True,
}
WIDTH, DEPTH, MLP, PATCH, IMAGE = 768, 12, 3072, 16, 224
NUM_LABELS = 5  # ViTForImageClassification's classifier in these tests


def _shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the architecture's state dict, by its transformers v4 name."""
    prefix = "vit." if architecture == "ViTForImageClassification" else ""
    shapes = {
        "embeddings.cls_token": (1, 1, WIDTH),
        "embeddings.position_embeddings": (1, (IMAGE // PATCH) ** 2 + 1, WIDTH),
        "embeddings.patch_embeddings.projection.weight": (WIDTH, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (WIDTH,),
    }
    for i in range(DEPTH):
        layer = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{layer}attention.attention.{name}.weight"] = (WIDTH, WIDTH)
            shapes[f"{layer}attention.attention.{name}.bias"] = (WIDTH,)
        shapes[f"{layer}attention.output.dense.weight"] = (WIDTH, WIDTH)
        shapes[f"{layer}attention.output.dense.bias"] = (WIDTH,)
        shapes[f"{layer}intermediate.dense.weight"] = (MLP, WIDTH)
        shapes[f"{layer}intermediate.dense.bias"] = (MLP,)
        shapes[f"{layer}output.dense.weight"] = (WIDTH, MLP)
        shapes[f"{layer}output.dense.bias"] = (WIDTH,)
        for name in ("layernorm_before", "layernorm_after"):
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (WIDTH,), (WIDTH,)
    shapes["layernorm.weight"], shapes["layernorm.bias"] = (WIDTH,), (WIDTH,)
    if architecture == "ViTModel":  # add_pooling_layer=True, as the in21k checkpoint
        shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (WIDTH, WIDTH), (WIDTH,)
    shapes = {prefix + k: v for k, v in shapes.items()}
    if architecture == "ViTForImageClassification":
        shapes["classifier.weight"], shapes["classifier.bias"] = (NUM_LABELS, WIDTH), (NUM_LABELS,)
    return shapes


def state_dict(architecture: str = "ViTModel", seed: int = 0) -> dict[str, np.ndarray]:
    """float32 tensors: N(0, 0.02) matrices, LayerNorm weights 1 + N(0, 0.1), the rest
    N(0, 0.02); drawn in sorted-name order from `default_rng(seed)`, so any process rebuilds them
    bit for bit."""
    if architecture not in ("ViTModel", "ViTForImageClassification"):
        raise ValueError(f"architecture: got {architecture!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(_shapes(architecture).items()):
        value = rng.standard_normal(shape, dtype=np.float32)
        is_norm = "layernorm" in name and name.endswith(".weight")
        out[name] = 1.0 + 0.1 * value if is_norm else 0.02 * value
    return out


def write_hf(folder: str, architecture: str = "ViTModel", seed: int = 0) -> str:
    """Writes `config.json` and `model.safetensors` of `state_dict(architecture, seed)`."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config = {**HF_CONFIG, "architectures": [architecture]}
    if architecture == "ViTForImageClassification":
        config["id2label"] = {str(i): f"class_{i}" for i in range(NUM_LABELS)}
        config["label2id"] = {f"class_{i}": i for i in range(NUM_LABELS)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(state_dict(architecture, seed), os.path.join(folder, "model.safetensors"))
    return folder


def images(count: int = 2, seed: int = 1) -> np.ndarray:
    """(count, 224, 224, 3) float32 test images in [-1, 1] (the ViT's input scaling): smooth
    seeded patterns, so patches differ as in photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32) / IMAGE
    out = []
    for _ in range(count):
        freq, phase = rng.uniform(1, 6, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
        channels = [np.sin(2 * np.pi * (f[0] * x + f[1] * y) + p) for f, p in zip(freq, phase)]
        noise = 0.2 * rng.standard_normal((IMAGE, IMAGE, 3), dtype=np.float32)
        out.append(np.clip(np.stack(channels, -1) * 0.8 + noise, -1, 1))
    return np.stack(out).astype(np.float32)
