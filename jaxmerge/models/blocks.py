"""The pre-norm transformer pieces the families build from: LayerNorm, attention, MLP, block,
patch embedding and the stack of blocks (the ViT's, CLIP's and SigLIP's, and CLIP's text tower,
which passes a causal mask). Their dense layers are `LoraDense`, so every family's targets are
`block_N/{attention/{query, key, value, out}, mlp/{fc1, fc2}}`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmerge.models import cpu_kernels
from jaxmerge.models.layers import LoraDense


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
