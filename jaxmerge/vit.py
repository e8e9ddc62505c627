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

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


LORA_IMPLS = ("factored", "merged")


class LoraDense(nn.Module):
    """y = x @ kernel + bias, plus a LoRA update read from the 'lora' collection when present.

    The 'lora' collection at this module's scope holds either factors
    `{lora_a: (in, r), lora_b: (r, out), scale: ()}`, giving `y += scale * (dropout(x) @ a) @ b`,
    or a dense update `{delta: (in, out)}` (a merged delta-space result), giving `y += x @ delta`.

    `lora_impl` picks how factors are applied; both give the same function:
      factored: the branch above; never forms the (in, out) product, so its cost grows with r.
      merged: `x @ (kernel + scale * a @ b)`, one wide matmul instead of four skinny ones; on
        XLA:CPU with ViT-Ti widths this trains faster (benchmarks/train_speed.py). Falls back
        to `factored` while LoRA dropout is active, since dropout acts on the branch's input.
    """

    in_features: int
    features: int
    lora_dropout: float = 0.0
    lora_impl: str = "factored"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = None

    def setup(self):
        self.kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features))
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))
        self.dropout = nn.Dropout(self.lora_dropout)

    def _factors(self, dtype):
        if not self.has_variable("lora", "lora_a"):
            return None
        a = self.get_variable("lora", "lora_a").astype(dtype)
        b = self.get_variable("lora", "lora_b").astype(dtype)
        # The scale is a constant of the adapter (alpha / r), never a trained quantity.
        scale = jax.lax.stop_gradient(self.get_variable("lora", "scale")).astype(dtype)
        return a, b, scale

    def _folds_factors(self, train: bool) -> bool:
        return self.lora_impl == "merged" and not (train and self.lora_dropout > 0)

    def weights(self, train: bool, dtype) -> tuple[jax.Array, jax.Array]:
        """(kernel, bias) in `dtype`, with every update that can be folded in added."""
        kernel = self.kernel.astype(dtype)
        if self.has_variable("lora", "delta"):
            kernel = kernel + self.get_variable("lora", "delta").astype(dtype)
        elif (factors := self._factors(dtype)) is not None and self._folds_factors(train):
            a, b, scale = factors
            kernel = kernel + (a @ b) * scale
        return kernel, self.bias.astype(dtype)

    def branch(self, x: jax.Array, train: bool) -> jax.Array | None:
        """The factored LoRA update of `x` not folded into `weights`, or None."""
        factors = self._factors(x.dtype)
        if factors is None or self._folds_factors(train):
            return None
        a, b, scale = factors
        h = self.dropout(x, deterministic=not train)
        return ((h @ a) @ b) * scale

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype or x.dtype)
        kernel, bias = self.weights(train, x.dtype)
        y = x @ kernel + bias
        update = self.branch(x, train)
        return y if update is None else y + update


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32.

    The backward pass is written out, `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with
    `g = dy * scale`: two reductions instead of the many XLA:CPU derives by itself.
    """
    return _layer_norm_forward(x, scale, bias, eps)[0]


def _layer_norm_forward(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (xhat, rstd, scale)


def _layer_norm_backward(eps, residuals, dy):
    xhat, rstd, scale = residuals
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    batch_axes = tuple(range(dy.ndim - 1))
    dscale = (dy32 * xhat).sum(batch_axes).astype(scale.dtype)
    dbias = dy32.sum(batch_axes).astype(scale.dtype)
    return dx.astype(dy.dtype), dscale, dbias


layer_norm.defvjp(
    lambda x, scale, bias, eps: _layer_norm_forward(x, scale, bias, eps), _layer_norm_backward
)


class LayerNorm(nn.Module):
    """Layer normalisation with flax's parameter names (`scale`, `bias`) and `layer_norm`."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm(x, scale, bias, self.epsilon)


class Attention(nn.Module):
    num_heads: int
    lora_dropout: float = 0.0
    lora_impl: str = "factored"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        x = x.astype(self.dtype or x.dtype)
        layers = [
            LoraDense(width, width, self.lora_dropout, self.lora_impl, dtype=self.dtype, name=n)
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
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
        return layers[3](context, train)


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf, `x * Phi(x)`, as Hugging Face ViT uses.

    Its derivative is given in closed form, `Phi(x) + x * phi(x)`: differentiating through
    `erf` costs XLA:CPU about a third of a ViT's backward pass.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476).astype(x.dtype))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))
    pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return x * cdf, (cdf + x * pdf) * dx


class Mlp(nn.Module):
    mlp_dim: int
    gelu_approximate: bool = False
    lora_dropout: float = 0.0
    lora_impl: str = "factored"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        dense = lambda n_in, n_out, name: LoraDense(  # noqa: E731
            n_in, n_out, self.lora_dropout, self.lora_impl, dtype=self.dtype, name=name
        )
        h = dense(width, self.mlp_dim, "fc1")(x, train)
        h = nn.gelu(h, approximate=True) if self.gelu_approximate else gelu_exact(h)
        return dense(self.mlp_dim, width, "fc2")(h, train)


class Block(nn.Module):
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    lora_dropout: float = 0.0
    lora_impl: str = "factored"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: LayerNorm(self.layer_norm_eps, name=name)  # noqa: E731
        attention = Attention(
            self.num_heads, self.lora_dropout, self.lora_impl, self.dtype, name="attention"
        )
        x = x + attention(norm("norm1")(x), train)
        mlp = Mlp(
            self.mlp_dim,
            self.gelu_approximate,
            self.lora_dropout,
            self.lora_impl,
            self.dtype,
            name="mlp",
        )
        return x + mlp(norm("norm2")(x), train)


class ViT(nn.Module):
    """Pre-norm ViT encoder. Call with images (B, H, W, C) scaled as the base was trained.

    Attributes:
      pool: "cls" (a learned class token, `pooled = tokens[:, 0]`) or "mean" (no class token,
        `pooled = mean(tokens)`).
      pooler: adds Hugging Face's pre-logits layer, `pooled = tanh(dense(pooled))`.
      layer_norm_eps: 1e-12 for Hugging Face checkpoints, 1e-6 for big_vision ones.
      gelu_approximate: tanh GELU as in big_vision checkpoints; exact erf GELU as in HF.
      image_size: sets the number of position embeddings (one per patch, plus the class token).
      lora_impl: "factored" or "merged", how LoRA factors are applied (see `LoraDense`).
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
    lora_impl: str = "factored"
    dtype: Any = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.pool not in POOLS:
            raise ValueError(f"ViT.pool: got {self.pool!r}; allowed: {POOLS}")
        if self.lora_impl not in LORA_IMPLS:
            raise ValueError(f"ViT.lora_impl: got {self.lora_impl!r}; allowed: {LORA_IMPLS}")
        batch, height, width, channels = images.shape
        p = self.patch_size
        if height % p or width % p or height != width or height != self.image_size:
            raise ValueError(
                f"ViT: images of shape {images.shape} do not fit image_size={self.image_size} "
                f"with patch_size={p}; resize the images or the position embeddings"
            )
        # Patchify as a reshape + dense: the same maths as a stride-p convolution with a
        # (p, p, C, D) kernel flattened in (row, column, channel) order.
        patches = images.reshape(batch, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
        x = LoraDense(
            p * p * channels,
            self.width,
            self.lora_dropout,
            self.lora_impl,
            dtype=self.dtype,
            name="patch_embed",
        )(patches, train)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.width)
        )
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = Block(
                self.num_heads,
                self.mlp_dim,
                self.layer_norm_eps,
                self.gelu_approximate,
                self.lora_dropout,
                self.lora_impl,
                self.dtype,
                name=f"block_{i}",
            )(x, train)
        tokens = LayerNorm(self.layer_norm_eps, name="encoder_norm")(x)
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
