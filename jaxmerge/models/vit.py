"""Vision Transformer (flax linen) whose dense layers accept LoRA parameters as a separate tree.

The forward takes the frozen base parameters and, optionally, an adapter:

    model = ViT(**vit.variant("Ti/16"))
    out = model.apply({"params": base, "lora": adapter}, images)   # with LoRA
    out = model.apply({"params": base}, images)                    # plain ViT

`out` is a dict: `pooled` (B, D), the feature a task head reads, and `tokens` (B, T, D), the
final-normed token sequence (Hugging Face's `last_hidden_state`).

Parameter paths (what LoRA target regexes match against):
    patch_embed, cls, pos_embedding,
    block_N/{norm1, attention/{query, key, value, out}, norm2, mlp/{fc1, fc2}},
    encoder_norm, pooler
Every dense kernel is 2-D with layout (in, out), so a LoRA update is `x @ a @ b`.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmerge import lora
from jaxmerge.interop import bigvision, files, hf
from jaxmerge.models import registry
from jaxmerge.models.blocks import LayerNorm, embed_patches, encoder_blocks
from jaxmerge.models.layers import LORA_COMPUTES, LoraDense
from jaxmerge.models.names import NameMap

# width, depth, mlp_dim, num_heads; the table big_vision and the ViT papers use.
_SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
POOLS = ("cls", "mean")

# Regexes over target paths ("block_3/attention/query") for the usual choices of LoRA targets.
TARGET_PRESETS = {
    "qv": r"attention/(query|value)$",
    "qkv": r"attention/(query|key|value)$",
    "attention": r"attention/(query|key|value|out)$",
    "mlp": r"mlp/(fc1|fc2)$",
    "all": r"(attention/(query|key|value|out)|mlp/(fc1|fc2))$",
}

# ViT attributes a base checkpoint fixes; the rest (dtype, dropout, kernels) are the run's choice.
ARCHITECTURE_KEYS = (
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "patch_size",
    "image_size",
    "channels",
    "pool",
    "pooler",
    "layer_norm_eps",
    "gelu_approximate",
)

# The one table of Hugging Face names, read and written: "v4" is transformers 4.x and the
# Hub's files (5.x writes them on save too); "v5" transformers 5.x in memory. The top names hold
# parameters of their own (cls_token) and the classifier ("head/out", a jaxmerge head).
_BLOCK_NAMES = {
    "attention/query": {"v4": "attention.attention.query", "v5": "attention.q_proj"},
    "attention/key": {"v4": "attention.attention.key", "v5": "attention.k_proj"},
    "attention/value": {"v4": "attention.attention.value", "v5": "attention.v_proj"},
    "attention/out": {"v4": "attention.output.dense", "v5": "attention.o_proj"},
    "mlp/fc1": {"v4": "intermediate.dense", "v5": "mlp.fc1"},
    "mlp/fc2": {"v4": "output.dense", "v5": "mlp.fc2"},
    "norm1": {"v4": "layernorm_before", "v5": "layernorm_before"},
    "norm2": {"v4": "layernorm_after", "v5": "layernorm_after"},
}
HF_NAMES = NameMap(
    layers={"v4": "encoder.layer", "v5": "layers"},
    blocks=_BLOCK_NAMES,
    top={
        "cls": "embeddings.cls_token",
        "pos_embedding": "embeddings.position_embeddings",
        "patch_embed": "embeddings.patch_embeddings.projection",
        "encoder_norm": "layernorm",
        "pooler": "pooler.dense",
        "head/out": "classifier",
    },
    strip=("vit.",),  # ViTForImageClassification's
    classifier_prefix="vit.",
    without_classifier=("pooler",),
    peft_targets=r"block_\d+/(attention/(query|key|value|out)|mlp/(fc1|fc2))|pooler",
)


def variant(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of `ViT` for a named variant such as "Ti/16", "B/32" or "mu/4".

    Overrides (e.g. `depth=4`) replace entries of the table.
    """
    match = re.fullmatch(r"(\w+)/(\d+)", name)
    if match is None or match.group(1) not in _SIZES:
        raise ValueError(
            f"variant: unknown ViT variant {name!r}; expected '<size>/<patch>' with size one of "
            f"{sorted(_SIZES)} and an integer patch size, e.g. 'B/16'"
        )
    width, depth, mlp_dim, num_heads = _SIZES[match.group(1)]
    kwargs = dict(
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        patch_size=int(match.group(2)),
    )
    kwargs.update(overrides)
    return kwargs


class ViT(nn.Module):
    """Pre-norm ViT encoder. Call with images (B, H, W, C) scaled as the base was trained.

    Attributes:
      pool: "cls" (a learned class token, `pooled = tokens[:, 0]`) or "mean" (no class token,
        `pooled = mean(tokens)`).
      pooler: adds Hugging Face's pre-logits layer, `pooled = tanh(dense(pooled))`.
      layer_norm_eps: 1e-12 for Hugging Face checkpoints, 1e-6 for big_vision ones.
      gelu_approximate: tanh GELU as in big_vision checkpoints; exact erf GELU as in HF.
      image_size: sets the number of position embeddings (one per patch, plus the class token).
      lora_compute: "branch" or "fold", how LoRA factors are applied (see `LoraDense`).
      kernels: "auto", "cpu" or "plain" LayerNorm and GELU (see `cpu_kernels`).
      dtype: the compute dtype of matmuls (None: the inputs', float32). Mixed precision with
        bfloat16: parameters stay float32 and are cast where they are used (gradients are
        float32), while softmax, LayerNorm statistics, the residual stream and the outputs are
        float32.
    """

    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    patch_size: int = 16
    image_size: int = 224
    channels: int = 3
    pool: str = "cls"
    pooler: bool = False
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.pool not in POOLS:
            raise ValueError(f"ViT.pool: got {self.pool!r}; allowed: {POOLS}")
        if "lora" in self.variables and not self.is_initializing():
            # At trace time (once per compile under jit): a target the base lacks is an error,
            # never silently ignored.
            lora.check_against_base(self.variables["lora"], self.variables["params"])
        if self.lora_compute not in LORA_COMPUTES:
            raise ValueError(
                f"ViT.lora_compute: got {self.lora_compute!r}; allowed: {LORA_COMPUTES}"
            )
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p or height != width or height != self.image_size:
            raise ValueError(
                f"ViT: images of shape {images.shape} do not fit image_size={self.image_size} "
                f"with patch_size={p}; resize the images or the position embeddings"
            )
        class_token = nn.initializers.zeros if self.pool == "cls" else None
        x = embed_patches(self, images, train, class_token)
        x = encoder_blocks(self, x, train, "gelu_tanh" if self.gelu_approximate else "gelu")
        tokens = LayerNorm(self.layer_norm_eps, self.kernels, name="encoder_norm")(x)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
        if self.pooler:
            pooler = LoraDense(self.width, self.width, dtype=self.dtype, name="pooler")
            pooled = jnp.tanh(pooler(pooled, train))
        return {"pooled": pooled.astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}


resample_pos_embedding = files.resample_pos_embedding


def init_params(model: ViT, key: jax.Array) -> dict:
    """Random base parameters for `model` (for tests and pretraining from scratch)."""
    images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
    return jax.jit(model.init)(key, images)["params"]


# ----------------------------------------------------------------------------- pretrained


def check_params(kwargs: dict, params, source: str, names: dict | None = None) -> None:
    """Raises a ValueError naming the first parameter missing, extra or of the wrong shape for
    `ViT(**kwargs)`; `names` maps paths to the checkpoint's tensor names, quoted as well."""
    model = ViT(**kwargs)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), "f4")
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    files.check_shapes(expected, params, source, names, f"ViT({kwargs})")


def load_hf(folder: str, *, dtype=jnp.float32) -> tuple[dict, dict, dict | None]:
    """Loads a Hugging Face `ViTModel` or `ViTForImageClassification` folder.

    Reads `config.json` and `model.safetensors` (or its shards); tensor names by `HF_NAMES`.

    Returns:
      (vit_kwargs, params, head): `ViT(**vit_kwargs)` is the matching model (pooler=True iff
      the checkpoint has one), `params` its parameter tree in `dtype`, and `head` the
      classifier (`{"out": {"kernel", "bias"}}`, for `heads.MlpHead(hidden=0, ...)`) or None.

    Raises:
      ValueError: a missing file (naming the path), an unknown architecture or parameter, or a
        parameter whose shape does not match the config (naming the parameter).
    """
    kwargs, params, head, names = hf.read_hf_vit(folder, HF_NAMES)
    check_params(kwargs, params, f"Hugging Face checkpoint {folder!r}", names)
    return kwargs, files.as_jax(params, dtype), None if head is None else files.as_jax(head, dtype)


def load_bigvision(
    path: str, *, image_size: int | None = None, dtype=jnp.float32
) -> tuple[dict, dict, dict | None]:
    """Loads a big_vision / vision_transformer ViT `.npz` (`interop.bigvision`), position
    embeddings resampled to `image_size` (None: the trained size); returns as `load_hf`."""
    kwargs, params, head = bigvision.read_bigvision_npz(path, image_size=image_size)
    check_params(kwargs, params, f"big_vision checkpoint {path!r}")
    return kwargs, files.as_jax(params, dtype), None if head is None else files.as_jax(head, dtype)


def load_pretrained(source: str, path: str, model) -> tuple[dict, dict]:
    """(ViT kwargs, params) of a pretrained base: `source` "hf" (a ViTModel folder) or
    "bigvision" (an .npz), for `model`, a `run_config.ModelSettings` (its image_size; its
    pooler: a ViTModel checkpoint's pooler is left out unless asked for, as heads read the
    class token, as ViTForImageClassification's classifier does)."""
    if source == "bigvision":
        return load_bigvision(path, image_size=model.image_size)[:2]
    kwargs, params = load_hf(path)[:2]
    if kwargs["pooler"] and not model.pooler:
        params = {k: v for k, v in params.items() if k != "pooler"}
        kwargs = {**kwargs, "pooler": False}
    elif model.pooler and not kwargs["pooler"]:
        raise ValueError(
            f"config.model.pooler: True, but the checkpoint {path!r} has no pooler; allowed: False"
        )
    return kwargs, params


def save_hf(folder: str, kwargs: dict, params, naming: str = "v4") -> str:
    """Writes a ViT backbone (an adapter folded in, if any) as a Hugging Face `ViTModel` folder,
    `config.json` and `model.safetensors`, that `transformers.ViTModel.from_pretrained` loads
    (add `add_pooling_layer=False` when the ViT has no pooler). `naming` "v4" writes the Hub's
    tensor names, which transformers 4.x and 5.x both read; "v5" the 5.x module names.

    Raises:
      ValueError: a ViT that `ViTModel` cannot express (mean pooling, a channel count other
        than 3), an unknown naming, a folder that exists and is not empty, or parameters
        that do not fit `kwargs`.
    """
    check_params(dict(kwargs), params, "save_hf")
    return hf.save_hf_vit(folder, kwargs, params, HF_NAMES, naming)


# The family entry that `models.get("vit")` returns.
registry.register(
    registry.Family(
        "vit",
        ViT,
        variant,
        ARCHITECTURE_KEYS,
        TARGET_PRESETS,
        init_params,
        names=HF_NAMES,
        sources=("hf", "bigvision"),
        load_pretrained=load_pretrained,
        save_hf=save_hf,
        images_in_compute_dtype=True,
        config_fields=("image_size", "pool", "pooler", "layer_norm_eps", "gelu_approximate"),
    )
)
