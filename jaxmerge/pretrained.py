"""Base ViT weights from Hugging Face and big_vision checkpoints, as jaxmerge parameter trees.

    vit_kwargs, params, head = load_hf_vit("path/to/vit-base-patch16-224")
    out = vit.ViT(**vit_kwargs).apply({"params": params}, images)

    vit_kwargs, params, head = load_bigvision_npz("augreg_B16.npz", image_size=384)

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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lora, vit

Tree = Any
HF_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
# Hugging Face activation name -> gelu_approximate.
HF_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}

# Hugging Face parameter names (after dropping a "vit." prefix) -> (jaxmerge path, conversion).
# The Hub files use the transformers 4.x names, which transformers 5.x also writes on save; the
# 5.x in-memory names (layers.N.attention.q_proj, ...) are accepted too.
_LINEAR = ("kernel", lambda w: w.T)
_HF_BLOCK = {
    r"attention\.attention\.query|attention\.q_proj": "attention/query",
    r"attention\.attention\.key|attention\.k_proj": "attention/key",
    r"attention\.attention\.value|attention\.v_proj": "attention/value",
    r"attention\.output\.dense|attention\.o_proj": "attention/out",
    r"intermediate\.dense|mlp\.fc1": "mlp/fc1",
    r"output\.dense|mlp\.fc2": "mlp/fc2",
    r"layernorm_before": "norm1",
    r"layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls",
    "embeddings.position_embeddings": "pos_embedding",
    "embeddings.patch_embeddings.projection": "patch_embed",
    "layernorm": "encoder_norm",
    "pooler.dense": "pooler",
    "classifier": "head/out",
}
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
        return json.load(f)


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


def _as_jax(tree: Tree, dtype) -> Tree:
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
    return vit_kwargs, _as_jax(params, dtype), None if head is None else _as_jax(head, dtype)


# ----------------------------------------------------------------------------- big_vision


def _dense(flat: Mapping[str, np.ndarray], prefix: str, reshape: Callable | None = None) -> dict:
    kernel, bias = flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"]
    if reshape is not None:
        kernel, bias = reshape(kernel, bias)
    return {"kernel": kernel, "bias": bias}


def _attention(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    """Per-head (D, H, hd) query/key/value and (H, hd, D) out kernels as 2-D (in, out)."""
    qkv = lambda k, b: (k.reshape(k.shape[0], -1), b.reshape(-1))  # noqa: E731
    out = lambda k, b: (k.reshape(-1, k.shape[-1]), b)  # noqa: E731
    node = {name: _dense(flat, f"{prefix}/{name}", qkv) for name in ("query", "key", "value")}
    node["out"] = _dense(flat, f"{prefix}/out", out)
    return node


def _norm(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    return {"scale": flat[f"{prefix}/scale"], "bias": flat[f"{prefix}/bias"]}


def _unstack_scanned(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned layout (`encoderblock/...` with a leading depth axis) as blocks."""
    scanned = [k for k in flat if k.startswith("Transformer/encoderblock/")]
    for key in scanned:
        value = flat.pop(key)
        rest = key.removeprefix("Transformer/encoderblock/")
        for i in range(value.shape[0]):
            flat[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return flat


def _submodule(names: set[str], pattern: str, block: str, index: int = 0) -> str:
    """The index-th (by number) submodule of a block matching pattern, e.g. LayerNorm_2."""
    found = sorted(
        (n for n in names if re.fullmatch(pattern, n)), key=lambda n: int(n.split("_")[-1])
    )
    if len(found) <= index:
        raise ValueError(f"big_vision checkpoint: block {block!r} has no {pattern!r} module")
    return f"{block}/{found[index]}"


def bigvision_to_params(flat: Mapping[str, np.ndarray]) -> tuple[dict, Tree, Tree | None]:
    """(vit_kwargs without image_size, params, head) from a flat '/'-joined big_vision dict.

    Accepts the vision_transformer augreg names (`MultiHeadDotProductAttention_1`,
    `LayerNorm_0/2`, `MlpBlock_3`) and big_vision's own (`..._0`, `LayerNorm_0/1`), unscanned
    or scanned.

    Raises:
      ValueError: naming a missing parameter, or for an unsupported (MAP-head) checkpoint.
    """
    try:
        return _bigvision_to_params(flat)
    except KeyError as error:
        raise ValueError(f"big_vision checkpoint: missing parameter {error.args[0]!r}") from None


def _bigvision_to_params(flat: Mapping[str, np.ndarray]) -> tuple[dict, Tree, Tree | None]:
    flat = _unstack_scanned({k.removeprefix("params/"): np.asarray(v) for k, v in flat.items()})
    if any(k.startswith("MAPHead") for k in flat):
        raise ValueError(
            "big_vision checkpoint: MAP-head pooling is not supported; allowed: cls, gap"
        )
    blocks = sorted(
        {m.group(0) for k in flat if (m := re.match(r"Transformer/encoderblock_\d+", k))},
        key=lambda b: int(b.rsplit("_", 1)[1]),
    )
    required = ("embedding/kernel", "Transformer/encoder_norm/scale")
    missing = [k for k in required if k not in flat] + ([] if blocks else ["encoderblock_0"])
    if missing:
        raise ValueError(
            f"big_vision checkpoint: missing parameter {missing[0]!r}; is this a ViT checkpoint "
            f"with augreg or big_vision names?"
        )
    embedding = flat["embedding/kernel"]
    patch, _, channels, width = embedding.shape
    params: dict = {
        "patch_embed": {"kernel": embedding.reshape(-1, width), "bias": flat["embedding/bias"]},
        "encoder_norm": _norm(flat, "Transformer/encoder_norm"),
    }
    has_cls = "cls" in flat
    if has_cls:
        params["cls"] = flat["cls"]
    pos_key = next(
        (k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if k in flat),
        None,
    )
    if pos_key is None:
        raise ValueError("big_vision checkpoint: missing parameter 'Transformer/posembed_input'")
    params["pos_embedding"] = flat[pos_key]
    num_heads = None
    for i, block in enumerate(blocks):
        names = {k[len(block) + 1 :].split("/")[0] for k in flat if k.startswith(block + "/")}
        attention = _submodule(names, r"MultiHeadDotProductAttention_\d+", block)
        mlp = _submodule(names, r"MlpBlock_\d+", block)
        num_heads = num_heads or flat[f"{attention}/query/kernel"].shape[1]
        params[f"block_{i}"] = {
            "norm1": _norm(flat, _submodule(names, r"LayerNorm_\d+", block, 0)),
            "attention": _attention(flat, attention),
            "norm2": _norm(flat, _submodule(names, r"LayerNorm_\d+", block, 1)),
            "mlp": {"fc1": _dense(flat, f"{mlp}/Dense_0"), "fc2": _dense(flat, f"{mlp}/Dense_1")},
        }
    if "pre_logits/kernel" in flat:
        params["pooler"] = _dense(flat, "pre_logits")
    head = {"out": _dense(flat, "head")} if "head/kernel" in flat else None
    fc1 = params["block_0"]["mlp"]["fc1"]["kernel"]
    vit_kwargs = dict(
        width=width,
        depth=len(blocks),
        mlp_dim=fc1.shape[1],
        num_heads=num_heads,
        patch_size=patch,
        channels=channels,
        pool="cls" if has_cls else "mean",
        pooler="pooler" in params,
        layer_norm_eps=1e-6,
        gelu_approximate=True,
    )
    return vit_kwargs, params, head


def load_bigvision_npz(
    path: str, *, image_size: int | None = None, dtype=jnp.float32
) -> tuple[dict, Tree, Tree | None]:
    """Loads a big_vision / vision_transformer ViT `.npz` (augreg naming), tanh GELU, eps 1e-6.

    Args:
      path: the .npz file, keys '/'-joined parameter paths.
      image_size: the input size to run at; the position embeddings are bilinearly resampled
        from the checkpoint's grid (`vit.resample_pos_embedding`). None keeps the trained size.

    Returns:
      (vit_kwargs, params, head) as in `load_hf_vit`; `pooler` is the `pre_logits` layer and
      `head` the checkpoint's `head` (None if it has none).

    Raises:
      ValueError: a missing file (naming it), an unsupported layout, a bad image_size or a
        parameter whose shape does not fit the others (naming it).
    """
    if not os.path.isfile(path):
        raise ValueError(f"missing file: {path!r} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files if not k.startswith("opt/")}
    vit_kwargs, params, head = bigvision_to_params(flat)
    patch, has_cls = vit_kwargs["patch_size"], vit_kwargs["pool"] == "cls"
    grid = params["pos_embedding"].shape[1] - int(has_cls)
    side = int(round(grid**0.5))
    if side * side != grid:
        raise ValueError(
            f"big_vision checkpoint {path!r}: parameter 'pos_embedding' has {grid} patch "
            f"positions, not a square grid"
        )
    vit_kwargs["image_size"] = image_size or side * patch
    if vit_kwargs["image_size"] % patch:
        raise ValueError(
            f"load_bigvision_npz: image_size={image_size!r}; allowed: a multiple of the patch "
            f"size {patch}"
        )
    new_grid = (vit_kwargs["image_size"] // patch) ** 2
    if new_grid != grid:
        pos = jnp.asarray(params["pos_embedding"], jnp.float32)
        params["pos_embedding"] = np.asarray(vit.resample_pos_embedding(pos, new_grid, has_cls))
    check_params(vit_kwargs, params, f"big_vision checkpoint {path!r}")
    return vit_kwargs, _as_jax(params, dtype), None if head is None else _as_jax(head, dtype)
