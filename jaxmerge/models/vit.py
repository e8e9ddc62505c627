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
from jaxmerge.models import cpu_kernels, registry
from jaxmerge.models.layers import LORA_COMPUTES, LoraDense

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

# The one table of Hugging Face names: jaxmerge path inside a block -> the transformers module
# name inside `<layers>.N.`, per naming. "v4": transformers 4.x and the Hub's files (5.x writes
# them on save too); "v5": transformers 5.x in memory.
HF_LAYERS = {"v4": "encoder.layer", "v5": "layers"}
HF_BLOCK_NAMES = {
    "attention/query": {"v4": "attention.attention.query", "v5": "attention.q_proj"},
    "attention/key": {"v4": "attention.attention.key", "v5": "attention.k_proj"},
    "attention/value": {"v4": "attention.attention.value", "v5": "attention.v_proj"},
    "attention/out": {"v4": "attention.output.dense", "v5": "attention.o_proj"},
    "mlp/fc1": {"v4": "intermediate.dense", "v5": "mlp.fc1"},
    "mlp/fc2": {"v4": "output.dense", "v5": "mlp.fc2"},
    "norm1": {"v4": "layernorm_before", "v5": "layernorm_before"},
    "norm2": {"v4": "layernorm_after", "v5": "layernorm_after"},
}
# Outside the blocks (after a "vit." prefix, which ViTForImageClassification adds).
HF_TOP_NAMES = {
    "embeddings.cls_token": "cls",
    "embeddings.position_embeddings": "pos_embedding",
    "embeddings.patch_embeddings.projection": "patch_embed",
    "layernorm": "encoder_norm",
    "pooler.dense": "pooler",
    "classifier": "head/out",
}


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


class LayerNorm(nn.Module):
    """Layer normalisation with flax's parameter names (`scale`, `bias`)."""

    epsilon: float = 1e-6
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return cpu_kernels.norm_and_gelu(self.kernels)[0](x, scale, bias, self.epsilon)


class Attention(nn.Module):
    num_heads: int
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        """Multihead self-attention of x (B, T, D); `mask`, boolean and broadcastable to
        (B, heads, T, T), is True where a query may attend to a key (None: everywhere)."""
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        x = x.astype(self.dtype or x.dtype)
        layers = [
            LoraDense(width, width, self.lora_dropout, self.lora_compute, dtype=self.dtype, name=n)
            for n in ("query", "key", "value", "out")
        ]
        # One (width, 3 * width) matmul for query, key and value: XLA:CPU runs narrow matmuls
        # far below its peak.
        kernels, biases = zip(*(layer.weights(train, x.dtype) for layer in layers[:3]))
        qkv = jnp.split(x @ jnp.concatenate(kernels, 1) + jnp.concatenate(biases), 3, axis=-1)
        for i, layer in enumerate(layers[:3]):
            if (update := layer.branch(x, train)) is not None:
                qkv[i] = qkv[i] + update
        # (batch, heads, tokens, head_dim) with plain batched matmuls: on XLA:CPU this is twice
        # as fast, forward and backward, as einsums over (batch, tokens, heads, head_dim).
        q, k, v = (t.reshape(batch, tokens, self.num_heads, head_dim) for t in qkv)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        logits = (q @ k) * jnp.asarray(head_dim**-0.5, q.dtype)
        # Softmax in float32 whatever the compute dtype: bf16 logits lose the small weights.
        logits = logits.astype(jnp.float32)
        if mask is not None:  # the most negative float, as transformers: a row never all -inf
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
        return layers[3](context, train)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation_fn(name: str, kernels: str = "auto"):
    """The MLP nonlinearity by name: gelu (erf; HF ViT), gelu_tanh (big_vision, SigLIP) or
    quick_gelu, x * sigmoid(1.702 x) (OpenAI CLIP)."""
    if name == "gelu":
        return cpu_kernels.norm_and_gelu(kernels)[1]
    if name == "gelu_tanh":
        return lambda h: nn.gelu(h, approximate=True)
    if name == "quick_gelu":
        return lambda h: h * jax.nn.sigmoid(jnp.asarray(1.702, h.dtype) * h)
    raise ValueError(f"activation: got {name!r}; allowed: {ACTIVATIONS}")


class Mlp(nn.Module):
    mlp_dim: int
    activation: str = "gelu"
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        dense = lambda n_in, n_out, name: LoraDense(  # noqa: E731
            n_in, n_out, self.lora_dropout, self.lora_compute, dtype=self.dtype, name=name
        )
        h = dense(width, self.mlp_dim, "fc1")(x, train)
        h = activation_fn(self.activation, self.kernels)(h)
        return dense(self.mlp_dim, width, "fc2")(h, train)


def mlp(module: nn.Module, activation: str, name: str) -> Mlp:
    """An `Mlp` with `module`'s sizes and settings (a `Block`, a tower's MAP head)."""
    return Mlp(
        module.mlp_dim,
        activation,
        module.lora_dropout,
        module.lora_compute,
        module.dtype,
        module.kernels,
        name=name,
    )


class Block(nn.Module):
    """x + attention(norm1(x)), then + mlp(norm2(x)): the pre-norm block of ViT, CLIP and
    SigLIP (and CLIP's text tower, with a causal `mask`; see `Attention`). The residual stream
    keeps its dtype (float32) whatever the compute dtype."""

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
    dtype: Any = None
    kernels: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        norm = lambda name: LayerNorm(self.layer_norm_eps, self.kernels, name=name)  # noqa: E731
        attention = Attention(
            self.num_heads, self.lora_dropout, self.lora_compute, self.dtype, name="attention"
        )
        x = x + attention(norm("norm1")(x), train, mask).astype(x.dtype)
        return x + mlp(self, self.activation, "mlp")(norm("norm2")(x), train).astype(x.dtype)


def embed_patches(
    module: nn.Module, images: jax.Array, train: bool, class_token_init=None
) -> jax.Array:
    """The token sequence entering the first block, with its parameters in `module`'s own
    scope (`patch_embed`, `cls`, `pos_embedding`): patch embeddings, a class token in front
    when `class_token_init` is given, plus position embeddings. float32 whatever the compute
    dtype (big_vision's `dtype_mm`): matmuls run in `module.dtype` and add to float32 sums,
    so rounding does not pile up over the depth of the network."""
    batch, height, width, channels = images.shape
    p = module.patch_size
    # Patchify as a reshape + dense: the same maths as a stride-p convolution with a
    # (p, p, C, D) kernel flattened in (row, column, channel) order.
    patches = images.reshape(batch, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
    x = LoraDense(
        p * p * channels,
        module.width,
        module.lora_dropout,
        module.lora_compute,
        dtype=module.dtype,
        name="patch_embed",
    )(patches, train)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if class_token_init is not None:
        cls = module.param("cls", class_token_init, (1, 1, module.width))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
    pos = module.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], module.width)
    )
    return x + pos.astype(x.dtype)


def encoder_blocks(
    module: nn.Module, x: jax.Array, train: bool, activation: str, mask: jax.Array | None = None
) -> jax.Array:
    """`module.depth` blocks `block_0` ... with `module`'s sizes and settings; `mask` as in
    `Attention`."""
    for i in range(module.depth):
        x = Block(
            module.num_heads,
            module.mlp_dim,
            module.layer_norm_eps,
            activation,
            module.lora_dropout,
            module.lora_compute,
            module.dtype,
            module.kernels,
            name=f"block_{i}",
        )(x, train, mask)
    return x


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


def resample_pos_embedding(pos_embedding: jax.Array, num_patches: int, has_cls: bool) -> jax.Array:
    """Bilinearly resizes a (1, [1 +] N, D) position embedding to `num_patches` patch positions.

    The class token's embedding, if any, is kept as it is; the patch grid is resized.
    """
    cls, grid = (pos_embedding[:, :1], pos_embedding[:, 1:]) if has_cls else (None, pos_embedding)
    old_side, new_side = int(round(grid.shape[1] ** 0.5)), int(round(num_patches**0.5))
    if old_side**2 != grid.shape[1] or new_side**2 != num_patches:
        raise ValueError(
            f"resample_pos_embedding: grids must be square; got {grid.shape[1]} -> {num_patches}"
        )
    if old_side != new_side:
        grid = grid.reshape(1, old_side, old_side, -1)
        grid = jax.image.resize(grid, (1, new_side, new_side, grid.shape[-1]), "bilinear")
        grid = grid.reshape(1, num_patches, -1)
    return grid if cls is None else jnp.concatenate([cls, grid], axis=1)


def init_params(model: ViT, key: jax.Array) -> dict:
    """Random base parameters for `model` (for tests and pretraining from scratch)."""
    images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
    return jax.jit(model.init)(key, images)["params"]


# The family entry that `models.get("vit")` returns.
registry.register(
    registry.Family("vit", ViT, variant, ARCHITECTURE_KEYS, TARGET_PRESETS, init_params)
)
