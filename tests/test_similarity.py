"""Similarity measures: closed forms on constructed adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import similarity


def adapter(a, b, scale=1.0, path=("block_0", "attention", "query")):
    node = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    node["scale"] = jnp.asarray(scale, jnp.float32)
    tree = node
    for name in reversed(path):
        tree = {name: tree}
    return tree


def random_adapter(key, d_in=16, d_out=12, rank=3):
    ka, kb = jax.random.split(key)
    return adapter(jax.random.normal(ka, (d_in, rank)), jax.random.normal(kb, (rank, d_out)))


@pytest.mark.parametrize("measure", sorted(similarity.MEASURES))
def test_an_adapter_is_fully_similar_to_itself(measure):
    a = random_adapter(jax.random.key(0))
    assert similarity.MEASURES[measure](a, a) == pytest.approx(1.0, abs=1e-6)


def test_scaling_changes_neither_measure_and_a_sign_flips_the_cosine():
    x = random_adapter(jax.random.key(1))
    node = x["block_0"]["attention"]["query"]
    scaled = adapter(node["lora_a"], node["lora_b"], scale=3.0)
    flipped = adapter(node["lora_a"], -node["lora_b"])
    assert similarity.delta_cosine(x, scaled) == pytest.approx(1.0, abs=1e-6)
    assert similarity.delta_cosine(x, flipped) == pytest.approx(-1.0, abs=1e-6)
    for side in similarity.SIDES:
        assert similarity.subspace_overlap(x, flipped, side) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_updates_have_zero_cosine_and_zero_overlap():
    eye_in, eye_out = np.eye(8), np.eye(6)
    first = adapter(eye_in[:, :2], eye_out[:2])  # reads e0, e1; writes f0, f1
    second = adapter(eye_in[:, 2:4], eye_out[2:4])  # reads e2, e3; writes f2, f3
    assert similarity.delta_cosine(first, second) == pytest.approx(0.0, abs=1e-7)
    for side in similarity.SIDES:
        assert similarity.subspace_overlap(first, second, side) == pytest.approx(0.0, abs=1e-7)


def test_half_shared_subspace_gives_overlap_one_half():
    eye_in, eye_out = np.eye(8), np.eye(6)
    first = adapter(eye_in[:, [0, 1]], eye_out[:2])
    second = adapter(eye_in[:, [1, 2]], eye_out[:2])
    assert similarity.subspace_overlap(first, second, "input") == pytest.approx(0.5, abs=1e-6)
    assert similarity.subspace_overlap(first, second, "output") == pytest.approx(1.0, abs=1e-6)
    # dW_1 = e0 f0^T + e1 f1^T, dW_2 = e1 f0^T + e2 f1^T share no entry: cosine 0
    assert similarity.delta_cosine(first, second) == pytest.approx(0.0, abs=1e-7)


def test_means_over_targets_and_pairwise_keys():
    a = random_adapter(jax.random.key(2))
    b = random_adapter(jax.random.key(3))
    two_a = {**a, **adapter(*[np.eye(4)] * 2, path=("block_1", "attention", "value"))}
    two_b = {**b, **adapter(*[np.eye(4)] * 2, path=("block_1", "attention", "value"))}
    expected = (similarity.delta_cosine(a, b) + 1.0) / 2
    assert similarity.delta_cosine(two_a, two_b) == pytest.approx(expected, abs=1e-6)
    table = similarity.pairwise({"x": a, "y": b, "z": a}, similarity.delta_cosine)
    assert list(table) == [("x", "y"), ("x", "z"), ("y", "z")]
    assert table["x", "z"] == pytest.approx(1.0, abs=1e-6)


def test_adapters_without_shared_targets_are_an_error():
    a = random_adapter(jax.random.key(4))
    b = adapter(np.eye(4), np.eye(4), path=("block_1", "mlp", "fc1"))
    with pytest.raises(ValueError, match="share no target"):
        similarity.delta_cosine(a, b)


def test_correlations():
    x = [1.0, 2.0, 3.0, 4.0]
    assert similarity.pearson(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert similarity.rank_correlation(x, [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    assert similarity.rank_correlation(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert np.isnan(similarity.pearson(x, [1.0, 1.0, 1.0, 1.0]))
