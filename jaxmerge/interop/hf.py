"""Hugging Face ViT checkpoints (ViTModel, ViTForImageClassification) <-> jaxmerge trees.

The conversion of the file format, named by the ViT family's `NameMap` (`models.vit.HF_NAMES`),
which the family passes in; `models.vit.load_hf` and `models.vit.save_hf` are the loader and
writer that also check every tensor against the shapes `vit.ViT` expects:

    vit_kwargs, params, head = vit.load_hf("path/to/vit-base-patch16-224")

`head` is the checkpoint's classifier as the parameters of `heads.MlpHead(hidden=0,
outputs=num_classes)`, `{"out": {"kernel": (D, classes), "bias": (classes,)}}`, reading the
ViT's `pooled` feature, or None when the checkpoint has no classifier.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxmerge import lora
from jaxmerge.interop import files

Tree = Any
HF_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
# Hugging Face activation name -> gelu_approximate.
HF_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
_HF_IGNORED = ("embeddings.mask_token",)  # ViTModel(use_mask_token=True); unused at inference


def _hf_leaf(module: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """(jaxmerge leaf name, converted value) of one Hugging Face tensor."""
    if module == "patch_embed" and leaf == "weight":
        # Conv (D, C, p, p) -> (p, p, C, D) -> (p*p*C, D): the (row, col, channel) patch order.
        return "kernel", value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    if leaf == "weight":
        is_norm = module.endswith(("norm1", "norm2", "encoder_norm"))
        return ("scale", value) if is_norm else ("kernel", value.T)
    return leaf, value


def hf_to_params(
    state: Mapping[str, np.ndarray], names
) -> tuple[Tree, Tree | None, dict[str, str]]:
    """Renames and transposes a Hugging Face ViT state dict into (params, head or None, paths),
    by the family's `NameMap` `names`; `paths` maps each jaxmerge parameter path to the tensor
    name it came from. Module names may be of either naming, with or without `vit.`.

    Raises:
      ValueError: for a tensor name that is not part of a ViTModel/ViTForImageClassification.
    """
    params: dict = {}
    paths = {}
    for name, value in state.items():
        if name.removeprefix("vit.") in _HF_IGNORED:
            continue
        path, leaf = names.ours(name), None  # cls_token, position_embeddings: tensors
        if path is None or name.removeprefix("vit.") not in names.top.values():
            module, _, leaf = name.rpartition(".")
            path = names.ours(module)
        if path is None:
            raise ValueError(
                f"Hugging Face checkpoint: parameter {name!r} is not part of a ViT "
                f"({'/'.join(HF_ARCHITECTURES)}); is this another architecture?"
            )
        if leaf is not None:
            leaf, value = _hf_leaf(path, leaf, np.asarray(value))
            path = f"{path}/{leaf}"
        params = lora.set_at(params, path, np.asarray(value))
        paths[path] = name
    head = params.pop("head", None)
    return params, head, paths


def _square(config: Mapping, field: str, source: str) -> int:
    value = config.get(field)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: {field}={value!r}; allowed: a square size")
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {field}={value!r}; allowed: a positive integer")
    return value


def hf_vit_kwargs(config: Mapping, *, pooler: bool, source: str = "config.json") -> dict:
    """`ViT` keyword arguments for a Hugging Face ViTConfig dict.

    Raises:
      ValueError: for a model_type, architecture, activation or pooler ViT cannot express.
    """
    if config.get("model_type", "vit") != "vit":
        raise ValueError(f"{source}: model_type={config.get('model_type')!r}; allowed: 'vit'")
    unknown = set(config.get("architectures") or ()) - set(HF_ARCHITECTURES)
    if unknown:
        raise ValueError(
            f"{source}: unknown architecture {sorted(unknown)}; allowed: {HF_ARCHITECTURES}"
        )
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act={act!r}; allowed: {sorted(HF_ACTIVATIONS)}")
    width = config["hidden_size"]
    if pooler and config.get("pooler_act", "tanh") != "tanh":
        raise ValueError(f"{source}: pooler_act={config['pooler_act']!r}; allowed: 'tanh'")
    if pooler and config.get("pooler_output_size", width) != width:
        raise ValueError(
            f"{source}: pooler_output_size={config['pooler_output_size']!r}; allowed: "
            f"hidden_size ({width}), the only pooler size ViT has"
        )
    return dict(
        width=width,
        depth=config["num_hidden_layers"],
        mlp_dim=config["intermediate_size"],
        num_heads=config["num_attention_heads"],
        patch_size=_square(config, "patch_size", source),
        image_size=_square(config, "image_size", source),
        channels=config.get("num_channels", 3),
        pool="cls",
        pooler=pooler,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        gelu_approximate=HF_ACTIVATIONS[act],
    )


def read_hf_vit(folder: str, names) -> tuple[dict, Tree, Tree | None, dict[str, str]]:
    """(vit_kwargs, params, head, {path: tensor name}) of a Hugging Face `ViTModel` or
    `ViTForImageClassification` folder (config.json, model.safetensors or its shards), as
    numpy; q/k/v biases are zero when the config has `qkv_bias: false`. `models.vit.load_hf`
    checks the shapes.
    """
    config = files.read_json(os.path.join(folder, "config.json"))
    params, head, paths = hf_to_params(files.read_safetensors(folder), names)
    source = f"Hugging Face checkpoint {folder!r}"
    vit_kwargs = hf_vit_kwargs(config, pooler="pooler" in params, source=source)
    if not config.get("qkv_bias", True):
        for i in range(vit_kwargs["depth"]):
            for name in ("query", "key", "value"):
                path = f"block_{i}/attention/{name}/bias"
                params = lora.set_at(params, path, np.zeros(vit_kwargs["width"], np.float32))
    if head is not None and np.shape(head["out"]["kernel"])[0] != vit_kwargs["width"]:
        raise ValueError(
            f"{source}: parameter 'classifier.weight' has shape "
            f"{np.shape(head['out']['kernel'])[::-1]}; expected (num_labels, {vit_kwargs['width']})"
        )
    return vit_kwargs, params, head, paths


# ----------------------------------------------------------------------------- writing


def params_to_hf(params: Tree, patch_size: int, names, naming: str = "v4") -> dict[str, np.ndarray]:
    """A ViT parameter tree as a Hugging Face `ViTModel` state dict (the inverse of
    `hf_to_params`, by the same `NameMap`): kernels (in, out) -> weights (out, in), the patch
    kernel back to a conv."""
    state = {}
    for key, value in jax.tree_util.tree_leaves_with_path(params):
        *module, leaf = jax.tree_util.keystr(key, simple=True, separator="/").split("/")
        module, value = "/".join(module), np.asarray(value, np.float32)
        if not module:  # cls, pos_embedding: parameters of their own
            state[names.theirs(leaf, naming)] = value
            continue
        if module == "patch_embed" and leaf == "kernel":  # (p*p*C, D) -> (D, C, p, p)
            p = patch_size
            value = value.reshape(p, p, -1, value.shape[1]).transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            value = value.T
        name = "weight" if leaf in ("kernel", "scale") else leaf
        state[f"{names.theirs(module, naming)}.{name}"] = np.ascontiguousarray(value)
    return state


def save_hf_vit(folder: str, vit_kwargs: Mapping, params: Tree, names, naming: str = "v4") -> str:
    """Writes a ViT backbone as a Hugging Face `ViTModel` folder, `config.json` and
    `model.safetensors` (`models.vit.save_hf` checks the shapes first); see `vit.save_hf`.

    Raises:
      ValueError: a ViT that `ViTModel` cannot express (mean pooling, a channel count other
        than 3), an unknown naming, or a folder that exists and is not empty.
    """
    from safetensors.numpy import save_file

    if naming not in names.namings:
        raise ValueError(f"naming={naming!r}; allowed: {names.namings}")
    if vit_kwargs.get("pool", "cls") != "cls":
        raise ValueError(
            f"pool={vit_kwargs['pool']!r}: a Hugging Face ViTModel reads the class token; "
            "allowed: a ViT with pool='cls'"
        )
    if vit_kwargs.get("channels", 3) != 3:
        raise ValueError(f"channels={vit_kwargs['channels']}; allowed: 3 (RGB)")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder!r} exists and is not empty; allowed: a new or empty folder")
    config = {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": vit_kwargs["width"],
        "num_hidden_layers": vit_kwargs["depth"],
        "num_attention_heads": vit_kwargs["num_heads"],
        "intermediate_size": vit_kwargs["mlp_dim"],
        "hidden_act": "gelu_new" if vit_kwargs.get("gelu_approximate") else "gelu",
        "image_size": vit_kwargs["image_size"],
        "patch_size": vit_kwargs["patch_size"],
        "num_channels": 3,
        "layer_norm_eps": float(vit_kwargs.get("layer_norm_eps", 1e-6)),
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": vit_kwargs["patch_size"],
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = params_to_hf(params, vit_kwargs["patch_size"], names, naming)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return os.path.abspath(folder)
