"""Base ViT weights from Hugging Face checkpoints, as jaxmerge parameter trees.

    vit_kwargs, params, head = load_hf_vit("path/to/vit-base-patch16-224")
    out = vit.ViT(**vit_kwargs).apply({"params": params}, images)

`head` is the checkpoint's classifier as the parameters of `heads.MlpHead(hidden=0,
outputs=num_classes)`, `{"out": {"kernel": (D, classes), "bias": (classes,)}}`, reading the
ViT's `pooled` feature, or None when the checkpoint has no classifier. Every tensor is checked
against the shapes `vit.ViT(**vit_kwargs)` expects, so a bad file fails here, naming the
parameter, not later inside `apply`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lora
from jaxmerge.models import vit

Tree = Any
HF_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
# Hugging Face activation name -> gelu_approximate.
HF_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}

# Module name inside a transformers block (either naming) -> jaxmerge path, from the one table.
_HF_BLOCK = {
    "|".join(re.escape(n) for n in sorted(set(names.values()))): path
    for path, names in vit.HF_BLOCK_NAMES.items()
}
_HF_TOP = vit.HF_TOP_NAMES
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


def hf_module_path(module: str) -> str | None:
    """The jaxmerge path of a Hugging Face ViT module name, or None if it is not one.

    'vit.encoder.layer.3.attention.attention.query' (transformers 4.x names, and the Hub's) and
    'layers.3.attention.q_proj' (transformers 5.x) both give 'block_3/attention/query'.
    """
    module = module.removeprefix("vit.")
    if module in _HF_TOP:
        return _HF_TOP[module]
    match = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)", module)
    if match is None:
        return None
    sub = next((p for r, p in _HF_BLOCK.items() if re.fullmatch(r, match.group(2))), None)
    return sub and f"block_{match.group(1)}/{sub}"


def hf_to_params(state: Mapping[str, np.ndarray]) -> tuple[Tree, Tree | None, dict[str, str]]:
    """Renames and transposes a Hugging Face ViT state dict into (params, head or None, names).

    `names` maps each jaxmerge parameter path to the tensor name it came from.

    Raises:
      ValueError: for a tensor name that is not part of a ViTModel/ViTForImageClassification.
    """
    params: dict = {}
    names = {}
    for name, value in state.items():
        if name.removeprefix("vit.") in _HF_IGNORED:
            continue
        path, leaf = hf_module_path(name), None
        if path is None or name.removeprefix("vit.") not in _HF_TOP:
            module, _, leaf = name.rpartition(".")
            path = hf_module_path(module)
        if path is None:
            raise ValueError(
                f"Hugging Face checkpoint: parameter {name!r} is not part of a ViT "
                f"({'/'.join(HF_ARCHITECTURES)}); is this another architecture?"
            )
        if leaf is not None:
            leaf, value = _hf_leaf(path, leaf, np.asarray(value))
            path = f"{path}/{leaf}"
        params = lora.set_at(params, path, np.asarray(value))
        names[path] = name
    head = params.pop("head", None)
    return params, head, names


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"missing file: {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r} is not valid JSON ({error})") from None


def _read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards its index lists, as numpy arrays."""
    from safetensors.numpy import load_file

    single, index = (os.path.join(folder, f"model.safetensors{s}") for s in ("", ".index.json"))
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        files = [os.path.join(folder, shard) for shard in shards]
    else:
        raise ValueError(
            f"missing file: {single!r} does not exist (nor a sharded {os.path.basename(index)}); "
            f"only safetensors checkpoints are supported, convert pytorch_model.bin first"
        )
    state = {}
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"missing file: {file!r} (listed in {index!r}) does not exist")
        state.update(load_file(file))
    return state


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


def check_params(
    vit_kwargs: Mapping, params: Tree, source: str, names: Mapping[str, str] | None = None
) -> None:
    """Raises a ValueError naming the first parameter missing, extra or of the wrong shape.

    `names` maps jaxmerge paths to the checkpoint's own tensor names, quoted as well.
    """
    names = names or {}
    quote = lambda path: f"{path!r}" + (f" ({names[path]!r})" if path in names else "")  # noqa: E731
    model = vit.ViT(**vit_kwargs)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), "f4")
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    want = {
        jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(k, simple=True, separator="/"): np.shape(v)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            raise ValueError(f"{source}: parameter {path!r} is missing")
        if path not in want:
            raise ValueError(f"{source}: parameter {quote(path)} is not part of ViT({vit_kwargs})")
        if tuple(got[path]) != tuple(want[path]):
            raise ValueError(
                f"{source}: parameter {quote(path)} has shape {tuple(got[path])}; the config "
                f"implies {tuple(want[path])}"
            )


def as_jax(tree: Tree, dtype) -> Tree:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def load_hf_vit(folder: str, *, dtype=jnp.float32) -> tuple[dict, Tree, Tree | None]:
    """Loads a Hugging Face `ViTModel` or `ViTForImageClassification` folder.

    Reads `config.json` and `model.safetensors` (or its shards). Parameter names may carry a
    `vit.` prefix; q/k/v biases are zero when the config has `qkv_bias: false`.

    Returns:
      (vit_kwargs, params, head): `vit.ViT(**vit_kwargs)` is the matching model (pooler=True iff
      the checkpoint has one), `params` its parameter tree in `dtype`, and `head` the
      classifier (`{"out": {"kernel", "bias"}}`, for `heads.MlpHead(hidden=0, ...)`) or None.

    Raises:
      ValueError: a missing file (naming the path), an unknown architecture or parameter, or a
        parameter whose shape does not match the config (naming the parameter).
    """
    config = _read_json(os.path.join(folder, "config.json"))
    params, head, names = hf_to_params(_read_safetensors(folder))
    source = f"Hugging Face checkpoint {folder!r}"
    vit_kwargs = hf_vit_kwargs(config, pooler="pooler" in params, source=source)
    if not config.get("qkv_bias", True):
        for i in range(vit_kwargs["depth"]):
            for name in ("query", "key", "value"):
                path = f"block_{i}/attention/{name}/bias"
                params = lora.set_at(params, path, np.zeros(vit_kwargs["width"], np.float32))
    check_params(vit_kwargs, params, source, names)
    if head is not None and np.shape(head["out"]["kernel"])[0] != vit_kwargs["width"]:
        raise ValueError(
            f"{source}: parameter 'classifier.weight' has shape "
            f"{np.shape(head['out']['kernel'])[::-1]}; expected (num_labels, {vit_kwargs['width']})"
        )
    return vit_kwargs, as_jax(params, dtype), None if head is None else as_jax(head, dtype)


# ----------------------------------------------------------------------------- writing

HF_NAMINGS = tuple(vit.HF_LAYERS)


def _hf_name(path: str, naming: str) -> str:
    """'block_3/attention/query' -> 'encoder.layer.3.attention.attention.query' (v4) or
    'layers.3.attention.q_proj' (v5); top-level modules by `vit.HF_TOP_NAMES`."""
    top = {p: name for name, p in _HF_TOP.items()}
    if path in top:
        return top[path]
    block, _, sub = path.partition("/")
    return (
        f"{vit.HF_LAYERS[naming]}.{block.removeprefix('block_')}.{vit.HF_BLOCK_NAMES[sub][naming]}"
    )


def params_to_hf(params: Tree, patch_size: int, naming: str = "v4") -> dict[str, np.ndarray]:
    """A ViT parameter tree as a Hugging Face `ViTModel` state dict (the inverse of
    `hf_to_params`): kernels (in, out) -> weights (out, in), the patch kernel back to a conv."""
    state = {}
    for key, value in jax.tree_util.tree_leaves_with_path(params):
        *module, leaf = jax.tree_util.keystr(key, simple=True, separator="/").split("/")
        module, value = "/".join(module), np.asarray(value, np.float32)
        if not module:  # cls, pos_embedding: parameters of their own
            state[_hf_name(leaf, naming)] = value
            continue
        if module == "patch_embed" and leaf == "kernel":  # (p*p*C, D) -> (D, C, p, p)
            p = patch_size
            value = value.reshape(p, p, -1, value.shape[1]).transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            value = value.T
        name = "weight" if leaf in ("kernel", "scale") else leaf
        state[f"{_hf_name(module, naming)}.{name}"] = np.ascontiguousarray(value)
    return state


def save_hf_vit(folder: str, vit_kwargs: Mapping, params: Tree, naming: str = "v4") -> str:
    """Writes a ViT backbone (an adapter folded in, if any) as a Hugging Face `ViTModel` folder,
    `config.json` and `model.safetensors`, that `transformers.ViTModel.from_pretrained` loads
    (add `add_pooling_layer=False` when the ViT has no pooler). `naming` "v4" writes the Hub's
    tensor names, which transformers 4.x and 5.x both read; "v5" the 5.x module names.

    Raises:
      ValueError: a ViT that `ViTModel` cannot express (mean pooling, a channel count other
        than 3), an unknown naming, or a folder that exists and is not empty.
    """
    from safetensors.numpy import save_file

    if naming not in HF_NAMINGS:
        raise ValueError(f"naming={naming!r}; allowed: {HF_NAMINGS}")
    if vit_kwargs.get("pool", "cls") != "cls":
        raise ValueError(
            f"pool={vit_kwargs['pool']!r}: a Hugging Face ViTModel reads the class token; "
            "allowed: a ViT with pool='cls'"
        )
    if vit_kwargs.get("channels", 3) != 3:
        raise ValueError(f"channels={vit_kwargs['channels']}; allowed: 3 (RGB)")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder!r} exists and is not empty; allowed: a new or empty folder")
    check_params(vit_kwargs, params, "save_hf_vit")
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
    state = params_to_hf(params, vit_kwargs["patch_size"], naming)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return os.path.abspath(folder)
