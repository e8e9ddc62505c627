"""LoRA-capable layers: a dense layer that reads its low-rank update from the 'lora' collection.

Every model family builds its adapted layers from `LoraDense`, so adapters, merges and folding
work on any of them: a target is any `LoraDense` scope, its kernel laid out (in, out).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

# How a layer applies factored LoRA updates (see `LoraDense`).
LORA_COMPUTES = ("branch", "fold")


class LoraDense(nn.Module):
    """y = x @ kernel + bias, plus a LoRA update read from the 'lora' collection when present.

    The 'lora' collection at this module's scope holds either factors
    `{lora_a: (in, r), lora_b: (r, out), scale: ()}`, giving `y += scale * (dropout(x) @ a) @ b`,
    or a dense update `{delta: (in, out)}` (a merged delta-space result), giving `y += x @ delta`.

    `lora_compute` picks how factors are applied; both give the same function and gradient:
      branch: the side branch above; never forms the (in, out) product, so its cost grows
        with r. The default: it trained faster in `benchmarks/train_speed.py` (RESULTS.md).
      fold: `x @ (kernel + scale * a @ b)`, one wide matmul instead of four skinny ones. Falls
        back to `branch` while LoRA dropout is active, since dropout acts on the branch's input.

    A stack of adapters (`jaxmerge.adapter_stack`) also holds a gate on the rank axis, so that
    `y += scale * ((x @ a) * gate) @ b`: `gate` (R,) or (B, R) per example, or a router's,
    `gate = (mean_tokens(x) @ router_kernel + router_bias) @ gate_expand` per image, or a
    mixture router's `gate = softmax(mean_tokens(x) @ router_kernel + router_bias) @
    router_table`, the table (n, R) a gate per rank column. A gated
    branch is never folded, since its gate may differ between the examples of a batch.
    """

    in_features: int
    features: int
    lora_dropout: float = 0.0
    lora_compute: str = "branch"
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
        gated = self.has_variable("lora", "gate") or self.has_variable("lora", "router_kernel")
        return self.lora_compute == "fold" and not (train and self.lora_dropout > 0 or gated)

    def _gate(self, x: jax.Array, h: jax.Array) -> jax.Array | None:
        """The rank-axis gate of a stacked adapter (see the class docstring), shaped to
        broadcast against h (B, ..., R), or None for a plain adapter."""
        if self.has_variable("lora", "router_kernel"):
            # The router reads the layer's own input, averaged over the tokens: one gate per
            # image, so every token of an image takes the same mixture of adapters.
            feature = x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x
            logits = feature @ self.get_variable("lora", "router_kernel").astype(x.dtype)
            logits = logits + self.get_variable("lora", "router_bias").astype(x.dtype)
            if self.has_variable("lora", "router_table"):
                # A mixture router: the logits pick among n rows of rank-column gates (row d:
                # an image of task d), and `fusion` reads them to learn which task an image is.
                self.sow("intermediates", "route_logits", logits)
                table = self.get_variable("lora", "router_table").astype(x.dtype)
                gate = jax.nn.softmax(logits, axis=-1) @ table
            else:
                gate = logits @ self.get_variable("lora", "gate_expand").astype(x.dtype)
        elif self.has_variable("lora", "gate"):
            gate = self.get_variable("lora", "gate").astype(h.dtype)
        else:
            return None
        if gate.ndim == 2:  # one row per example: (B, R) -> (B, 1, ..., R)
            gate = gate.reshape(gate.shape[:1] + (1,) * (h.ndim - 2) + gate.shape[1:])
        return gate.astype(h.dtype)

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
        h = self.dropout(x, deterministic=not train) @ a
        gate = self._gate(x, h)
        return ((h if gate is None else h * gate) @ b) * scale

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype or x.dtype)
        kernel, bias = self.weights(train, x.dtype)
        y = x @ kernel + bias
        update = self.branch(x, train)
        return y if update is None else y + update
