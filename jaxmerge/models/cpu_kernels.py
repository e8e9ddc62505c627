"""Numerics tuned for XLA:CPU, behind one switch, beside the plain JAX versions they replace.

`cpu_layer_norm` (a custom VJP: two reductions in the backward pass instead of the many XLA:CPU
derives) and `cpu_gelu_exact` (a closed-form derivative instead of differentiating `erf`) compute
the same values and gradients as `layer_norm` and `gelu_exact` (tests/test_vit.py checks both),
but a custom VJP has no forward mode: `jax.jvp` through it fails. So models take a `kernels`
setting, `KERNELS`:
  auto   the CPU kernels on the CPU backend, the plain ones elsewhere (GPU, TPU);
  cpu    always the CPU kernels;
  plain  always the plain ones (forward-mode AD, e.g. linearised or Fisher merging, on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KERNELS = ("auto", "cpu", "plain")


def use_cpu_kernels(kernels: str) -> bool:
    """Whether the `kernels` setting picks the CPU-tuned kernels on this backend."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: got {kernels!r}; allowed: one of {list(KERNELS)}")
    return kernels == "cpu" or (kernels == "auto" and jax.default_backend() == "cpu")


def norm_and_gelu(kernels: str):
    """(layer_norm, gelu_exact) for a `kernels` setting."""
    if use_cpu_kernels(kernels):
        return cpu_layer_norm, cpu_gelu_exact
    return layer_norm, gelu_exact


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cpu_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """`layer_norm` with its backward pass written out,
    `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * scale`: two reductions
    instead of the many XLA:CPU derives by itself."""
    return _layer_norm_forward(x, scale, bias, eps)[0]


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32.

    Plain JAX: differentiable in forward and reverse mode to any order.
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


cpu_layer_norm.defvjp(
    lambda x, scale, bias, eps: _layer_norm_forward(x, scale, bias, eps), _layer_norm_backward
)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf, `x * Phi(x)`, as Hugging Face ViT uses (plain JAX)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476).astype(x.dtype))


@jax.custom_jvp
def cpu_gelu_exact(x: jax.Array) -> jax.Array:
    """`gelu_exact` with its derivative in closed form, `Phi(x) + x * phi(x)`: differentiating
    through `erf` costs XLA:CPU about a third of a ViT's backward pass."""
    return gelu_exact(x)


@cpu_gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))
    pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return x * cdf, (cdf + x * pdf) * dx
