"""Hugging Face CLIP and SigLIP image towers as jaxmerge trees (`models.clip.VisionTower`).

The conversion of the format, module names by the family's `NameMap` (`models.clip.HF_NAMES`);
`models.clip.load_hf` is the loader that also checks every tensor against the tower's shapes:

    kwargs, params, _ = clip.load_hf("clip-vit-base-patch32")   # CLIPModel or CLIPVisionModel

Folders: `CLIPVisionModel`, `CLIPVisionModelWithProjection` (its `visual_projection` becomes
the tower's `projection`), a full `CLIPModel` (its image tower and projection; the text tower
is skipped: `interop.clip_text` reads it) or `SiglipVisionModel` / `SiglipModel`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from jaxmerge import lora
from jaxmerge.interop import files

CLIP_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
SIGLIP_ARCHITECTURES = ("SiglipVisionModel", "SiglipModel")
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for fields a config.json omits.
_CONFIG_DEFAULTS = {
    "clip": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=32,
                 image_size=224, layer_norm_eps=1e-5),
    "siglip": dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16,
                   image_size=224, layer_norm_eps=1e-6),
}  # fmt: skip
# Text tensors, and the `position_ids` index buffers that checkpoints saved by transformers
# before 4.31 hold (openai's CLIP folders on the Hub among them): not parameters.
_SKIPPED = re.compile(r"(text_model\.|text_projection\.|logit_scale|logit_bias).*|.*position_ids")


class Collected:
    """Parameters gathered from a torch state dict, with the tensor name of each path (for
    the errors of `check_params`)."""

    def __init__(self):
        self.params: dict = {}
        self.names: dict[str, str] = {}

    def put(self, path: str, value, name: str) -> None:
        self.params = lora.set_at(self.params, path, np.asarray(value, np.float32))
        self.names[path] = name

    def put_layer(self, path: str, leaf: str, value, name: str) -> None:
        """A torch Linear or LayerNorm tensor: a Linear's weight (out, in) becomes the kernel
        (in, out), a LayerNorm's weight its scale, a bias stays a bias."""
        if leaf == "bias":
            self.put(f"{path}/bias", value, name)
        elif "norm" in path.rsplit("/", 1)[-1]:
            self.put(f"{path}/scale", value, name)
        else:
            self.put(f"{path}/kernel", value.T, name)


def hf_to_params(
    state: Mapping[str, np.ndarray], source: str, names
) -> tuple[dict, dict[str, str]]:
    """(params, {path: tensor name}) of a CLIP / SigLIP state dict, module names by the
    family's `NameMap` `names`; text tensors are skipped."""
    collected = Collected()
    put = collected.put
    for name, value in state.items():
        if _SKIPPED.fullmatch(name):
            continue
        key = name.removeprefix("vision_model.")
        value = np.asarray(value)
        if key == "embeddings.class_embedding":
            put("cls", value.reshape(1, 1, -1), name)
        elif key == "embeddings.position_embedding.weight":
            put("pos_embedding", value[None], name)
        elif key == "embeddings.patch_embedding.weight":  # (D, C, p, p) -> (p*p*C, D)
            put("patch_embed/kernel", value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0]), name)
        elif key == "head.probe":
            put("map_head/probe", value, name)
        elif key.startswith("head.attention.in_proj_"):  # torch MultiheadAttention: q, k, v
            leaf = "kernel" if key.endswith("weight") else "bias"
            for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                put(
                    f"map_head/attention/{part}/{leaf}",
                    chunk.T if leaf == "kernel" else chunk,
                    name,
                )
        else:
            module, _, leaf = key.rpartition(".")
            path = names.ours(module)
            if path is None or leaf not in ("weight", "bias"):
                raise ValueError(
                    f"{source}: parameter {name!r} is not part of a CLIP or SigLIP image tower"
                )
            collected.put_layer(path, leaf, value, name)
    # Layers Hugging Face builds without a bias (CLIP's patch embedding and projection).
    params = collected.params
    for path in ("patch_embed", "projection"):
        node = params.get(path)
        if node is not None and "bias" not in node:
            node["bias"] = np.zeros(node["kernel"].shape[1], np.float32)
    return params, collected.names


def _vision_config(config: Mapping, source: str) -> tuple[dict, int, str]:
    """(vision config, projection_dim or 0, family) of a config.json."""
    kind = config.get("model_type")
    known = CLIP_ARCHITECTURES + SIGLIP_ARCHITECTURES
    unknown = set(config.get("architectures") or ()) - set(known)
    if unknown:
        raise ValueError(f"{source}: unknown architecture {sorted(unknown)}; allowed: {known}")
    if kind in ("clip", "siglip"):
        vision = dict(config.get("vision_config") or {})
        return vision, config.get("projection_dim", 512) if kind == "clip" else 0, kind
    if kind in ("clip_vision_model", "siglip_vision_model"):
        projection = "CLIPVisionModelWithProjection" in (config.get("architectures") or ())
        return dict(config), config.get("projection_dim", 512) * projection, kind.split("_")[0]
    raise ValueError(
        f"{source}: model_type={kind!r}; allowed: clip, clip_vision_model, siglip, "
        f"siglip_vision_model"
    )


def hf_tower_kwargs(config: Mapping, *, source: str = "config.json") -> tuple[dict, str]:
    """(`VisionTower` kwargs, family name) of a Hugging Face CLIP / SigLIP config dict."""
    vision, projection_dim, family = _vision_config(config, source)
    act = vision.get("hidden_act", "quick_gelu" if family == "clip" else "gelu_pytorch_tanh")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act={act!r}; allowed: {sorted(HF_ACTIVATIONS)}")
    if family == "siglip" and not vision.get("vision_use_head", True):
        raise ValueError(f"{source}: vision_use_head=false; allowed: the MAP head (true)")
    defaults = _CONFIG_DEFAULTS[family]
    kwargs = dict(
        width=vision.get("hidden_size", defaults["width"]),
        depth=vision.get("num_hidden_layers", defaults["depth"]),
        mlp_dim=vision.get("intermediate_size", defaults["mlp_dim"]),
        num_heads=vision.get("num_attention_heads", defaults["num_heads"]),
        patch_size=vision.get("patch_size", defaults["patch_size"]),
        image_size=vision.get("image_size", defaults["image_size"]),
        channels=vision.get("num_channels", 3),
        layer_norm_eps=float(vision.get("layer_norm_eps", defaults["layer_norm_eps"])),
        activation=HF_ACTIVATIONS[act],
        pre_norm=family == "clip",
        pool="cls" if family == "clip" else "map",
        projection_dim=projection_dim,
    )
    return kwargs, family


def read_hf_tower(folder: str, names) -> tuple[dict, dict, dict[str, str]]:
    """(tower kwargs, params as numpy, {path: tensor name}) of the image tower of a Hugging
    Face CLIP or SigLIP folder (config.json, safetensors); `models.clip.load_hf` checks it."""
    source = f"Hugging Face checkpoint {folder!r}"
    config = files.read_json(os.path.join(folder, "config.json"))
    kwargs, _ = hf_tower_kwargs(config, source=source)
    params, paths = hf_to_params(files.read_safetensors(folder), source, names)
    return kwargs, params, paths


def family_of_hf(folder: str) -> str:
    """ "clip" or "siglip": the family of a Hugging Face folder's config.json."""
    config = files.read_json(os.path.join(folder, "config.json"))
    return hf_tower_kwargs(config, source=folder)[1]
