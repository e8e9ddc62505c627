"""ViT building blocks against closed forms and jax's reference ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.models import blocks, cpu_kernels, vit


def test_gelu_exact_and_its_closed_form_derivative_match_jax():
    x = jnp.linspace(-9.0, 9.0, 20001)
    reference = lambda v: jax.nn.gelu(v, approximate=False)
    np.testing.assert_allclose(cpu_kernels.cpu_gelu_exact(x), reference(x), atol=1e-6)
    grad = jax.vmap(jax.grad(cpu_kernels.cpu_gelu_exact))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(reference))(x), atol=1e-6)
    second = jax.vmap(jax.grad(jax.grad(cpu_kernels.cpu_gelu_exact)))(x)  # differentiable twice
    np.testing.assert_allclose(second, jax.vmap(jax.grad(jax.grad(reference)))(x), atol=1e-5)


def test_attention_matches_a_direct_softmax_formula():
    attention = blocks.Attention(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = attention.init(jax.random.key(1), x)["params"]
    out = attention.apply({"params": params}, x)
    p = jax.tree.map(np.asarray, params)
    xs = np.asarray(x, np.float64)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        proj = lambda name, cols=cols: (xs @ p[name]["kernel"] + p[name]["bias"])[..., cols]
        q, k, v = proj("query"), proj("key"), proj("value")
        logits = q @ k.transpose(0, 2, 1) / 2.0
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads.append(weights @ v)
    expected = np.concatenate(heads, -1) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_layer_norm_and_its_written_out_backward_match_autodiff():
    def reference(x, scale, bias, eps=1e-6):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps) * scale + bias

    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 + 2.0 * jax.random.normal(keys[0], (4, 7, 16))
    scale, bias = jax.random.normal(keys[1], (16,)), jax.random.normal(keys[2], (16,))
    dy = jax.random.normal(keys[3], x.shape)
    np.testing.assert_allclose(
        cpu_kernels.cpu_layer_norm(x, scale, bias, 1e-6), reference(x, scale, bias), atol=1e-5
    )
    ours = jax.vjp(lambda *a: cpu_kernels.cpu_layer_norm(*a, 1e-6), x, scale, bias)[1](dy)
    expected = jax.vjp(reference, x, scale, bias)[1](dy)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _mu_vit(kernels):
    model = vit.ViT(**vit.variant("mu/4", image_size=8, depth=2), kernels=kernels)
    params = vit.init_params(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    return model, params, images


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_cpu_kernels_and_plain_kernels_give_the_same_model_and_gradients():
    outputs, grads = [], []
    for kernels in ("cpu", "plain"):
        model, params, images = _mu_vit(kernels)
        loss = lambda p, m=model, x=images: m.apply({"params": p}, x)["pooled"].var()
        outputs.append(model.apply({"params": params}, images)["tokens"])
        grads.append(jax.grad(loss)(params))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_forward_mode_autodiff_runs_through_the_plain_kernels():
    """`jax.jvp` through a forward pass (what linearised or Fisher merging need): the plain path
    agrees with a central finite difference; the CPU path's custom VJP refuses forward mode."""
    model, params, images = _mu_vit("plain")
    tangent = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    pooled = lambda p: model.apply({"params": p}, images)["pooled"]
    _, derivative = jax.jvp(pooled, (params,), (tangent,))
    shifted = lambda t: jax.tree.map(lambda p, d: p + t * d, params, tangent)
    finite = (pooled(shifted(1e-2)) - pooled(shifted(-1e-2))) / 2e-2
    np.testing.assert_allclose(derivative, finite, rtol=1e-2, atol=1e-3)
    cpu_model, _, _ = _mu_vit("cpu")
    with np.testing.assert_raises(TypeError):
        jax.jvp(lambda p: cpu_model.apply({"params": p}, images)["pooled"], (params,), (tangent,))


def test_auto_kernels_follow_the_backend():
    assert cpu_kernels.use_cpu_kernels("auto") == (jax.default_backend() == "cpu")
    assert cpu_kernels.use_cpu_kernels("plain") is False
    np.testing.assert_raises_regex(
        ValueError, "kernels: got 'fast'", cpu_kernels.use_cpu_kernels, "fast"
    )
