"""CLIP and SigLIP image towers from Hugging Face folders and big_vision `.npz` files.

    kwargs, params, _ = load_hf_clip("clip-vit-base-patch32")   # CLIPModel or CLIPVisionModel
    out = clip.VisionTower(**kwargs).apply({"params": params}, images)
    kwargs, params, _ = load_siglip_npz("webli_en_b16_224.npz")  # big_vision SigLIP, MAP head
    adapter, _, _ = load_peft_clip_adapter("adapters/eurosat")    # PEFT LoRA on CLIPVisionModel
    kwargs, params, extras = load_hf_clip_text("clip-vit-base-patch32")  # CLIPModel's text tower

Hugging Face folders: `CLIPVisionModel`, `CLIPVisionModelWithProjection` (its
`visual_projection` becomes the tower's `projection`), a full `CLIPModel` (its image tower and
projection; the text tower is skipped) or `SiglipVisionModel` / `SiglipModel`. Each returns
`(tower kwargs, params, None)` like `interop.hf.load_hf_vit`; every tensor is checked against
the shapes `clip.VisionTower(**kwargs)` expects, naming the tensor. `load_hf_clip_text` reads
a `CLIPModel`'s text tower instead (`clip_text.TextTower`), with its `logit_scale` and
`visual_projection`: what `jaxmerge.zero_shot_heads` needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lora
from jaxmerge.interop import bigvision, hf
from jaxmerge.interop import peft as peft_io
from jaxmerge.models import clip, clip_text

Tree = Any
CLIP_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
SIGLIP_ARCHITECTURES = ("SiglipVisionModel", "SiglipModel")
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# Module names inside `encoder.layers.N.` (CLIP and SigLIP alike) -> jaxmerge paths.
HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attention/query",
    "self_attn.k_proj": "attention/key",
    "self_attn.v_proj": "attention/value",
    "self_attn.out_proj": "attention/out",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
}
HF_TOP_NAMES = {
    "embeddings.patch_embedding": "patch_embed",
    "pre_layrnorm": "pre_norm",
    "post_layernorm": "encoder_norm",
    "visual_projection": "projection",
    "head.attention.out_proj": "map_head/attention/out",
    "head.layernorm": "map_head/norm",
    "head.mlp.fc1": "map_head/mlp/fc1",
    "head.mlp.fc2": "map_head/mlp/fc2",
}
# Text tensors, and the `position_ids` index buffers that checkpoints saved by transformers
# before 4.31 hold (openai's CLIP folders on the Hub among them): not parameters.
_SKIPPED = re.compile(r"(text_model\.|text_projection\.|logit_scale|logit_bias).*|.*position_ids")


def hf_module_path(module: str) -> str | None:
    """The tower path of a Hugging Face CLIP / SigLIP module name, or None.

    'vision_model.encoder.layers.3.self_attn.q_proj' and 'encoder.layers.3.self_attn.q_proj'
    both give 'block_3/attention/query'.
    """
    module = module.removeprefix("vision_model.")
    if module in HF_TOP_NAMES:
        return HF_TOP_NAMES[module]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
    if match is None or match.group(2) not in HF_BLOCK_NAMES:
        return None
    return f"block_{match.group(1)}/{HF_BLOCK_NAMES[match.group(2)]}"


class _Collected:
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


def hf_to_params(state: Mapping[str, np.ndarray], source: str) -> tuple[dict, dict[str, str]]:
    """(params, {path: tensor name}) of a CLIP / SigLIP state dict; text tensors are skipped."""
    collected = _Collected()
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
            path = hf_module_path(module)
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
    defaults = clip.clip_variant("B/32") if family == "clip" else clip.siglip_variant("B/16")
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


def check_params(kwargs: Mapping, params: Tree, source: str, names: Mapping | None = None) -> None:
    """Raises a ValueError naming the first tensor missing, extra or of the wrong shape."""
    model = clip.VisionTower(**kwargs)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), "f4")
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    _compare_shapes(expected, params, source, names or {}, "this tower")


def _compare_shapes(expected: Tree, params: Tree, source: str, names: Mapping, what: str) -> None:
    quote = lambda path: f"{path!r}" + (f" ({names[path]!r})" if path in names else "")  # noqa: E731
    flat = lambda tree: {  # noqa: E731
        jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v))
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    want, got = flat(expected), flat(params)
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            raise ValueError(f"{source}: parameter {path!r} is missing")
        if path not in want:
            raise ValueError(f"{source}: parameter {quote(path)} is not part of {what}")
        if got[path] != want[path]:
            raise ValueError(
                f"{source}: parameter {quote(path)} has shape {got[path]}; the config implies "
                f"{want[path]}"
            )


def load_hf_clip(folder: str, *, dtype=jnp.float32) -> tuple[dict, Tree, None]:
    """Loads the image tower of a Hugging Face CLIP or SigLIP folder (config.json, safetensors).

    Returns:
      (kwargs, params, None): `clip.VisionTower(**kwargs)` is the tower (projection_dim > 0 for
      CLIPVisionModelWithProjection and CLIPModel), `params` its tree in `dtype`; no classifier.

    Raises:
      ValueError: a missing file, an unknown architecture, activation or tensor, or a tensor
        whose shape does not match the config (naming it).
    """
    source = f"Hugging Face checkpoint {folder!r}"
    config = hf._read_json(os.path.join(folder, "config.json"))
    kwargs, _ = hf_tower_kwargs(config, source=source)
    params, names = hf_to_params(hf._read_safetensors(folder), source)
    check_params(kwargs, params, source, names)
    return kwargs, hf.as_jax(params, dtype), None


def family_of_hf(folder: str) -> str:
    """ "clip" or "siglip": the family of a Hugging Face folder's config.json."""
    config = hf._read_json(os.path.join(folder, "config.json"))
    return hf_tower_kwargs(config, source=folder)[1]


# ----------------------------------------------------------------------------- big_vision


def _bigvision_tower(flat: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(kwargs without image_size, params) of an unscanned, prefix-free big_vision image tower."""
    get = bigvision._dense
    blocks = sorted(
        {int(m.group(1)) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    )
    embedding = flat["embedding/kernel"]
    patch, _, channels, width = embedding.shape
    params: dict = {
        "patch_embed": {"kernel": embedding.reshape(-1, width), "bias": flat["embedding/bias"]},
        "pos_embedding": flat["pos_embedding"].reshape(1, -1, width),
        "encoder_norm": bigvision._norm(flat, "Transformer/encoder_norm"),
    }
    for i in blocks:
        block = f"Transformer/encoderblock_{i}"
        params[f"block_{i}"] = {
            "norm1": bigvision._norm(flat, f"{block}/LayerNorm_0"),
            "attention": bigvision._attention(flat, f"{block}/MultiHeadDotProductAttention_0"),
            "norm2": bigvision._norm(flat, f"{block}/LayerNorm_1"),
            "mlp": {"fc1": get(flat, f"{block}/MlpBlock_0/Dense_0"),
                    "fc2": get(flat, f"{block}/MlpBlock_0/Dense_1")},
        }  # fmt: skip
    head = "MAPHead_0"
    params["map_head"] = {
        "probe": flat[f"{head}/probe"],
        "attention": bigvision._attention(flat, f"{head}/MultiHeadDotProductAttention_0"),
        "norm": bigvision._norm(flat, f"{head}/LayerNorm_0"),
        "mlp": {"fc1": get(flat, f"{head}/MlpBlock_0/Dense_0"),
                "fc2": get(flat, f"{head}/MlpBlock_0/Dense_1")},
    }  # fmt: skip
    if "head/kernel" in flat:  # an image-side projection (absent in the released SigLIPs)
        params["projection"] = get(flat, "head")
    kwargs = dict(
        width=width,
        depth=len(blocks),
        mlp_dim=params["block_0"]["mlp"]["fc1"]["kernel"].shape[1],
        num_heads=flat[
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
        ].shape[1],
        patch_size=patch,
        channels=channels,
        layer_norm_eps=1e-6,
        activation="gelu_tanh",
        pre_norm=False,
        pool="map",
        projection_dim=params["projection"]["kernel"].shape[1] if "projection" in params else 0,
    )
    return kwargs, params


def load_siglip_npz(
    path: str, *, image_size: int | None = None, dtype=jnp.float32
) -> tuple[dict, Tree, None]:
    """Loads the image tower of a big_vision SigLIP `.npz` (MAP head, tanh GELU, eps 1e-6).

    Keys may carry `params/` and `img/` prefixes (two-tower checkpoints: the `txt/` tower and
    the `t`, `b` temperature and bias are skipped); scanned (`encoderblock/` with a leading
    depth axis) or not.

    Args:
      image_size: the input size to run at; the position embeddings are bilinearly resampled
        (`vit.resample_pos_embedding`). None keeps the trained size.

    Raises:
      ValueError: a missing file or tensor (naming it), a checkpoint without a MAP head, a bad
        image_size, or a tensor whose shape does not fit the others.
    """
    from jaxmerge.models import vit

    if not os.path.isfile(path):
        raise ValueError(f"missing file: {path!r} does not exist")
    source = f"big_vision checkpoint {path!r}"
    with np.load(path, allow_pickle=False) as npz:
        flat = {}
        for key in npz.files:
            short = key.removeprefix("params/")
            if short.startswith(("txt/", "opt/")) or short in ("t", "b"):
                continue
            flat[short.removeprefix("img/")] = npz[key]
    flat = bigvision._unstack_scanned(flat)
    if "MAPHead_0/probe" not in flat:
        raise ValueError(f"{source}: no MAPHead_0/probe; allowed: SigLIP towers (MAP head)")
    try:
        kwargs, params = _bigvision_tower(flat)
    except KeyError as error:
        raise ValueError(f"{source}: missing parameter {error.args[0]!r}") from None
    patch, grid = kwargs["patch_size"], params["pos_embedding"].shape[1]
    side = int(round(grid**0.5))
    if side * side != grid:
        raise ValueError(f"{source}: 'pos_embedding' has {grid} positions, not a square grid")
    kwargs["image_size"] = image_size or side * patch
    if kwargs["image_size"] % patch:
        raise ValueError(
            f"load_siglip_npz: image_size={image_size!r}; allowed: a multiple of the patch size "
            f"{patch}"
        )
    new_grid = (kwargs["image_size"] // patch) ** 2
    if new_grid != grid:
        pos = jnp.asarray(params["pos_embedding"], jnp.float32)
        params["pos_embedding"] = np.asarray(vit.resample_pos_embedding(pos, new_grid, False))
    check_params(kwargs, params, source)
    return kwargs, hf.as_jax(params, dtype), None


# ----------------------------------------------------------------------------- PEFT


def load_peft_clip_adapter(folder: str) -> tuple[Tree, Tree | None, dict]:
    """A PEFT LoRA adapter of a Hugging Face CLIP / SigLIP image tower, as `load_peft_adapter`
    reads ViT adapters (module names `[vision_model.]encoder.layers.N.self_attn.q_proj`...)."""
    return peft_io.load_peft_adapter(folder, module_path=hf_module_path)


# ----------------------------------------------------------------------------- CLIP text tower

_TEXT_PREFIX = "text_model."


def hf_text_kwargs(config: Mapping, *, source: str = "config.json") -> dict:
    """`clip_text.TextTower` kwargs of a Hugging Face `CLIPModel` config dict (its
    `text_config` and `projection_dim`; missing fields take `CLIPTextConfig`'s defaults)."""
    kind = config.get("model_type")
    if kind != "clip":
        raise ValueError(
            f"{source}: model_type={kind!r} has no text tower; allowed: clip (a CLIPModel)"
        )
    text = dict(config.get("text_config") or {})
    act = text.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: text hidden_act={act!r}; allowed: {sorted(HF_ACTIVATIONS)}")
    defaults = clip_text.TextTower()
    return dict(
        vocab_size=text.get("vocab_size", defaults.vocab_size),
        max_length=text.get("max_position_embeddings", defaults.max_length),
        width=text.get("hidden_size", defaults.width),
        depth=text.get("num_hidden_layers", defaults.depth),
        mlp_dim=text.get("intermediate_size", defaults.mlp_dim),
        num_heads=text.get("num_attention_heads", defaults.num_heads),
        layer_norm_eps=float(text.get("layer_norm_eps", defaults.layer_norm_eps)),
        activation=HF_ACTIVATIONS[act],
        projection_dim=config.get("projection_dim", defaults.projection_dim),
        eos_token_id=text.get("eos_token_id", defaults.eos_token_id),
    )


def hf_to_text_params(
    state: Mapping[str, np.ndarray], source: str
) -> tuple[dict, dict, dict[str, str]]:
    """(text tower params, {"logit_scale", "visual_projection"}, {path: tensor name}) of a
    CLIPModel state dict; vision tensors are skipped. `visual_projection` is (in, out)."""
    collected, extras = _Collected(), {}
    put = collected.put
    for name, value in state.items():
        value = np.asarray(value)
        key = name.removeprefix(_TEXT_PREFIX)
        if name == "logit_scale":
            extras["logit_scale"] = np.float32(value.reshape(()))
        elif name == "visual_projection.weight":
            extras["visual_projection"] = value.T.astype(np.float32)
        elif name == "text_projection.weight":
            put("projection/kernel", value.T, name)
        elif not name.startswith(_TEXT_PREFIX) or key.endswith("position_ids"):
            continue  # the image tower, and the index buffer older transformers saved
        elif key == "embeddings.token_embedding.weight":
            put("token_embedding", value, name)
        elif key == "embeddings.position_embedding.weight":
            put("pos_embedding", value[None], name)
        else:
            module, _, leaf = key.rpartition(".")
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
            if module == "final_layer_norm":
                path = "encoder_norm"
            elif match and match.group(2) in HF_BLOCK_NAMES:
                path = f"block_{match.group(1)}/{HF_BLOCK_NAMES[match.group(2)]}"
            else:
                path = None
            if path is None or leaf not in ("weight", "bias"):
                raise ValueError(f"{source}: parameter {name!r} is not part of a CLIP text tower")
            collected.put_layer(path, leaf, value, name)
    return collected.params, extras, collected.names


def check_text_params(
    kwargs: Mapping, params: Tree, source: str, names: Mapping | None = None
) -> None:
    """Raises a ValueError naming the first text tensor missing, extra or of the wrong shape."""
    model = clip_text.TextTower(**kwargs)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    _compare_shapes(expected, params, source, names or {}, "this text tower")


def load_hf_clip_text(folder: str, *, dtype=jnp.float32) -> tuple[dict, Tree, dict]:
    """Loads the text tower of a Hugging Face `CLIPModel` folder (config.json, safetensors).

    Returns:
      (kwargs, params, extras): `clip_text.TextTower(**kwargs)` is the tower, `params` its tree
      in `dtype`, `extras` the rest of what zero-shot classification needs, as float32 numpy:
      `logit_scale` (a scalar; CLIP's temperature is its exp) and `visual_projection`
      (width of the image tower, projection_dim), as (in, out).

    Raises:
      ValueError: a missing file, a config without a text tower, an unknown activation or
        tensor, a missing one, or a tensor whose shape does not match the config (naming it).
    """
    source = f"Hugging Face checkpoint {folder!r}"
    config = hf._read_json(os.path.join(folder, "config.json"))
    kwargs = hf_text_kwargs(config, source=source)
    params, extras, names = hf_to_text_params(hf._read_safetensors(folder), source)
    check_text_params(kwargs, params, source, names)
    for key, name in (("logit_scale", "logit_scale"), ("visual_projection", "visual_projection")):
        if key not in extras:
            raise ValueError(f"{source}: tensor {name!r} is missing")
    if extras["visual_projection"].shape[1] != kwargs["projection_dim"]:
        raise ValueError(
            f"{source}: tensor 'visual_projection.weight' projects to "
            f"{extras['visual_projection'].shape[1]}; the config implies "
            f"projection_dim={kwargs['projection_dim']}"
        )
    return kwargs, hf.as_jax(params, dtype), extras
