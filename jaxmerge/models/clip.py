"""CLIP and SigLIP vision towers (flax linen), built from `LoraDense` like `vit.ViT`.

    model = VisionTower(**clip_variant("B/32"))                   # CLIP ViT-B/32
    out = model.apply({"params": base, "lora": adapter}, images)

Two families share the module: "clip" (OpenAI CLIP, Hugging Face `CLIPVisionModel` /
`CLIPVisionModelWithProjection`) and "siglip" (big_vision SigLIP image towers). They differ in
four switches, fixed by the family's variants and by the checkpoint loaders
(`load_hf`, `load_siglip_npz`):

    | switch       | clip                               | siglip                             |
    | pool         | "cls": class token                 | "map": attention pooling (MAPHead) |
    | pre_norm     | LayerNorm after the embeddings     | none                               |
    | activation   | "quick_gelu", x * sigmoid(1.702 x) | "gelu_tanh"                        |
    | encoder_norm | on the class token only            | on every token                     |

`out` holds `pooled` (B, width), the feature a task head reads (CLIP: the post-LayerNorm class
token, HF `pooler_output`; SigLIP: the MAP head's output, HF `pooler_output`), `tokens`
(B, T, D), HF's `last_hidden_state` (CLIP: before the post-LayerNorm, as HF), and with
`projection_dim > 0` `image_embeds` (B, projection_dim), the projected feature CLIP compares
with text embeddings (`jaxmerge.zero_shot`).

Parameter paths: patch_embed, cls (clip), pos_embedding, pre_norm (clip),
block_N/{norm1, attention/{query, key, value, out}, norm2, mlp/{fc1, fc2}}, encoder_norm,
map_head/{probe, attention/{query, key, value, out}, norm, mlp/{fc1, fc2}} (siglip),
projection. The block paths are the ViT's, so LoRA adapters, merges and folds work unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmerge import lora
from jaxmerge.interop import bigvision, files
from jaxmerge.interop import clip as clip_io
from jaxmerge.models import registry
from jaxmerge.models.blocks import ACTIVATIONS, LayerNorm, embed_patches, encoder_blocks, mlp
from jaxmerge.models.layers import LORA_COMPUTES, LoraDense
from jaxmerge.models.names import NameMap

POOLS = ("cls", "map")
# OpenAI CLIP's pixel normalisation (its preprocessor_config.json); SigLIP scales to [-1, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# width, depth, mlp_dim, num_heads, projection_dim (CLIP's shared image-text embedding size).
_CLIP_SIZES = {
    "mu": (32, 1, 64, 2, 16),
    "B": (768, 12, 3072, 12, 512),
    "L": (1024, 24, 4096, 16, 768),
}
_SIGLIP_SIZES = {
    "mu": (32, 1, 64, 2, 0),
    "B": (768, 12, 3072, 12, 0),
    "L": (1024, 24, 4096, 16, 0),
    "So400m": (1152, 27, 4304, 16, 0),
}

ARCHITECTURE_KEYS = (
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "patch_size",
    "image_size",
    "channels",
    "layer_norm_eps",
    "activation",
    "pre_norm",
    "pool",
    "projection_dim",
)

# Only the encoder blocks: the MAP head's attention has the same leaf names.
_BLOCK = r"block_\d+/"
TARGET_PRESETS = {
    "qv": _BLOCK + r"attention/(query|value)$",
    "qkv": _BLOCK + r"attention/(query|key|value)$",
    "attention": _BLOCK + r"attention/(query|key|value|out)$",
    "mlp": _BLOCK + r"mlp/(fc1|fc2)$",
    "all": _BLOCK + r"(attention/(query|key|value|out)|mlp/(fc1|fc2))$",
}

# The one table of Hugging Face names (CLIP and SigLIP alike; transformers 4.x and 5.x alike),
# read and written: `[vision_model.]encoder.layers.N.self_attn.q_proj`, ...
_BLOCK_NAMES = {
    path: {"v4": name, "v5": name}
    for path, name in {
        "attention/query": "self_attn.q_proj",
        "attention/key": "self_attn.k_proj",
        "attention/value": "self_attn.v_proj",
        "attention/out": "self_attn.out_proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
    }.items()
}
HF_NAMES = NameMap(
    layers={"v4": "encoder.layers", "v5": "encoder.layers"},
    blocks=_BLOCK_NAMES,
    top={
        "patch_embed": "embeddings.patch_embedding",
        "pre_norm": "pre_layrnorm",
        "encoder_norm": "post_layernorm",
        "projection": "visual_projection",
        "map_head/attention/out": "head.attention.out_proj",
        "map_head/norm": "head.layernorm",
        "map_head/mlp/fc1": "head.mlp.fc1",
        "map_head/mlp/fc2": "head.mlp.fc2",
    },
    strip=("vision_model.",),
    # CLIPVisionModel and SiglipVisionModel hold the tower as `vision_model` in transformers
    # 4.x, at the top in 5.x. No classifier_prefix: transformers' CLIPForImageClassification
    # reads mean patch tokens, not the feature jaxmerge's heads read.
    prefix={"v4": "vision_model."},
)


def _variant(sizes: dict, family: str, defaults: dict, name: str, **overrides: Any) -> dict:
    match = re.fullmatch(r"(\w+)/(\d+)", name)
    if match is None or match.group(1) not in sizes:
        raise ValueError(
            f"variant: unknown {family} variant {name!r}; expected '<size>/<patch>' with size "
            f"one of {sorted(sizes)} and an integer patch size, e.g. 'B/16'"
        )
    width, depth, mlp_dim, num_heads, projection_dim = sizes[match.group(1)]
    kwargs = dict(
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        patch_size=int(match.group(2)),
        projection_dim=projection_dim,
        **defaults,
    )
    kwargs.update(overrides)
    return kwargs


def clip_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """`VisionTower` kwargs of a CLIP variant ("B/32", "B/16", "L/14", tiny "mu/4").

    Overrides replace entries (a training config passes `image_size` and `layer_norm_eps`,
    the family's `config_fields`).
    """
    defaults = dict(
        image_size=224, layer_norm_eps=1e-5, activation="quick_gelu", pre_norm=True, pool="cls"
    )
    return _variant(_CLIP_SIZES, "CLIP", defaults, name, **overrides)


def siglip_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """`VisionTower` kwargs of a SigLIP image tower ("B/16", "L/16", "So400m/14", "mu/4")."""
    defaults = dict(
        image_size=224, layer_norm_eps=1e-6, activation="gelu_tanh", pre_norm=False, pool="map"
    )
    return _variant(_SIGLIP_SIZES, "SigLIP", defaults, name, **overrides)


class ProbeAttention(nn.Module):
    """Multihead attention of `queries` (B, Q, D) over `tokens` (B, T, D)."""

    num_heads: int
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None

    @nn.compact
    def __call__(self, queries: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        batch, length, width = tokens.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        dense = lambda name: LoraDense(  # noqa: E731
            width, width, self.lora_dropout, self.lora_compute, dtype=self.dtype, name=name
        )
        split = lambda t: t.reshape(batch, -1, heads, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        q = split(dense("query")(queries, train))
        k, v = split(dense("key")(tokens, train)), split(dense("value")(tokens, train))
        logits = (q @ k.transpose(0, 1, 3, 2)) * jnp.asarray(head_dim**-0.5, q.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, -1, width)
        return dense("out")(context, train)


class MapHead(nn.Module):
    """Multihead attention pooling (big_vision `MAPHead`): a learned probe attends over the
    tokens, then `x + mlp(norm(x))`; returns the probe's (B, D) output."""

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    activation: str = "gelu_tanh"
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        batch, _, width = tokens.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
        x = tokens.astype(self.dtype or tokens.dtype)
        queries = jnp.tile(probe.astype(x.dtype), (batch, 1, 1))
        attention = ProbeAttention(
            self.num_heads, self.lora_dropout, self.lora_compute, self.dtype, name="attention"
        )
        x = attention(queries, x, train).astype(tokens.dtype)
        norm = LayerNorm(self.layer_norm_eps, self.kernels, name="norm")
        return (x + mlp(self, self.activation, "mlp")(norm(x), train))[:, 0]


class VisionTower(nn.Module):
    """A CLIP or SigLIP image encoder. Call with images (B, H, W, C), normalised as the
    checkpoint expects (CLIP: (x - mean) / std with CLIP's mean and std).

    Attributes:
      pool: "cls" (class token; `pooled = encoder_norm(tokens[:, 0])`) or "map" (no class
        token; `pooled = MAPHead(encoder_norm(tokens))`).
      pre_norm: a LayerNorm on the embeddings before the first block (CLIP's `pre_layrnorm`).
      activation: the MLP nonlinearity, one of `ACTIVATIONS`.
      projection_dim: > 0 adds `image_embeds = projection(pooled)`; 0 for none.
      dtype, lora_dropout, lora_compute, kernels: as in `vit.ViT`.
    """

    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    channels: int = 3
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    pre_norm: bool = True
    pool: str = "cls"
    projection_dim: int = 0
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    def _check(self, images: jax.Array) -> None:
        for field, value, allowed in (
            ("pool", self.pool, POOLS),
            ("activation", self.activation, ACTIVATIONS),
            ("lora_compute", self.lora_compute, LORA_COMPUTES),
        ):
            if value not in allowed:
                raise ValueError(f"VisionTower.{field}: got {value!r}; allowed: {allowed}")
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or height != width or height != self.image_size:
            raise ValueError(
                f"VisionTower: images of shape {images.shape} do not fit image_size="
                f"{self.image_size} with patch_size={p}; resize the images"
            )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        self._check(images)
        if "lora" in self.variables and not self.is_initializing():
            lora.check_against_base(self.variables["lora"], self.variables["params"])
        dense = lambda n_in, n_out, name: LoraDense(  # noqa: E731
            n_in, n_out, self.lora_dropout, self.lora_compute, dtype=self.dtype, name=name
        )
        norm = lambda name: LayerNorm(self.layer_norm_eps, self.kernels, name=name)  # noqa: E731
        class_token = nn.initializers.normal(stddev=0.02) if self.pool == "cls" else None
        x = embed_patches(self, images, train, class_token)
        if self.pre_norm:
            x = norm("pre_norm")(x)
        x = encoder_blocks(self, x, train, self.activation)
        if self.pool == "cls":
            tokens, pooled = x, norm("encoder_norm")(x[:, 0])
        else:
            tokens = norm("encoder_norm")(x)
            pooled = MapHead(
                self.num_heads,
                self.mlp_dim,
                self.layer_norm_eps,
                self.activation,
                self.lora_dropout,
                self.lora_compute,
                self.dtype,
                self.kernels,
                name="map_head",
            )(tokens, train)
        out = {"pooled": pooled.astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}
        if self.projection_dim:
            embeds = dense(self.width, self.projection_dim, "projection")(pooled, train)
            out["image_embeds"] = embeds.astype(jnp.float32)
        return out


def init_params(model: VisionTower, key: jax.Array) -> dict:
    """Random base parameters for `model` (tests, dry runs)."""
    images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
    return jax.jit(model.init)(key, images)["params"]


# ----------------------------------------------------------------------------- pretrained


def check_params(kwargs: dict, params, source: str, names: dict | None = None) -> None:
    """Raises a ValueError naming the first tensor missing, extra or of the wrong shape for
    `VisionTower(**kwargs)`."""
    model = VisionTower(**kwargs)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), "f4")
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    files.check_shapes(expected, params, source, names, "this tower")


def load_hf(folder: str, *, dtype=jnp.float32) -> tuple[dict, dict, None]:
    """Loads the image tower of a Hugging Face CLIP or SigLIP folder (config.json, safetensors;
    `interop.clip`).

    Returns:
      (kwargs, params, None): `VisionTower(**kwargs)` is the tower (projection_dim > 0 for
      CLIPVisionModelWithProjection and CLIPModel), `params` its tree in `dtype`; no classifier.

    Raises:
      ValueError: a missing file, an unknown architecture, activation or tensor, or a tensor
        whose shape does not match the config (naming it).
    """
    kwargs, params, names = clip_io.read_hf_tower(folder, HF_NAMES)
    check_params(kwargs, params, f"Hugging Face checkpoint {folder!r}", names)
    return kwargs, files.as_jax(params, dtype), None


def load_siglip_npz(
    path: str, *, image_size: int | None = None, dtype=jnp.float32
) -> tuple[dict, dict, None]:
    """Loads the image tower of a big_vision SigLIP `.npz` (`interop.bigvision`), position
    embeddings resampled to `image_size` (None: the trained size); returns as `load_hf`."""
    kwargs, params = bigvision.read_siglip_npz(path, image_size=image_size)
    check_params(kwargs, params, f"big_vision checkpoint {path!r}")
    return kwargs, files.as_jax(params, dtype), None


def load_pretrained(source: str, path: str, model) -> tuple[dict, dict]:
    """(tower kwargs, params) of a pretrained base: "hf", a CLIP or SigLIP folder; "bigvision",
    a SigLIP `.npz` at `model`'s image_size (`run_config.ModelSettings`)."""
    if source == "bigvision":
        return load_siglip_npz(path, image_size=model.image_size)[:2]
    return load_hf(path)[:2]


registry.register(
    registry.Family(
        "clip",
        VisionTower,
        clip_variant,
        ARCHITECTURE_KEYS,
        TARGET_PRESETS,
        init_params,
        pixel_mean=CLIP_MEAN,
        pixel_std=CLIP_STD,
        names=HF_NAMES,
        sources=("hf",),
        load_pretrained=load_pretrained,
        images_in_compute_dtype=True,
    )
)
registry.register(
    registry.Family(
        "siglip",
        VisionTower,
        siglip_variant,
        ARCHITECTURE_KEYS,
        TARGET_PRESETS,
        init_params,
        names=HF_NAMES,
        sources=("hf", "bigvision"),
        load_pretrained=load_pretrained,
        images_in_compute_dtype=True,
    )
)
