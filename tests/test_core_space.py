"""Core Space merging (`merging.core_space`): exact for task arithmetic, the SVD methods equal
their full-space results, every method equal to itself run on numpy's cores and mapped back,
rank <= sum of ranks. Registry-wide invariants (jit = eager, dtypes, zero adapters, non-finite
inputs, factored output) run in test_merge.py and test_bad_inputs.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import lora, merging
from jaxmerge.merging.core_space import CORE_METHODS
from tests.golden_files import rel_err

QUERY, VALUE = "block_0/attention/query", "block_0/attention/value"
# R = 2 + 3 + 4 = 9: below both sides of the query (24, 20), above the value's input side (6).
SHAPES = {QUERY: (24, 20), VALUE: (6, 16)}
WEIGHTS = [0.5, 1.0, -2.0]
KEY = jax.random.key(0)


def adapter(seed, rank):
    rng = np.random.default_rng(seed)
    tree = {}
    for path, (fan_in, fan_out) in SHAPES.items():
        node = {
            "lora_a": jnp.asarray(rng.standard_normal((fan_in, rank)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((rank, fan_out)) * 0.1, jnp.float32),
            "scale": jnp.float32(2.0 / rank),
        }
        tree = lora.set_at(tree, path, node)
    return tree


MIXED = [adapter(0, 2), adapter(1, 3), adapter(2, 4)]
EQUAL = [adapter(3, 3), adapter(4, 3), adapter(5, 3)]


def dense(tree, path=QUERY):
    return np.asarray(lora.delta_of(lora.get_at(tree, path)), np.float64)


def merge(adapters, method, **params):
    return merging.merge(adapters, method, WEIGHTS, key=KEY, **params)


def test_core_task_arithmetic_is_task_arithmetic_for_mixed_ranks():
    got, want = merge(MIXED, "core_task_arithmetic"), merge(MIXED, "task_arithmetic")
    for path in SHAPES:
        assert rel_err(dense(got, path), dense(want, path)) < 1e-5, path


@pytest.mark.parametrize(
    ("method", "adapters"), [("iso_c", MIXED), ("iso_cts", MIXED), ("tsv", EQUAL)]
)
def test_svd_methods_equal_their_full_space_results(method, adapters):
    # Orthonormal bases commute with SVDs and polar factors. TSV-M keeps R / T pairs per task
    # in core space: with equal ranks that is the rank 3 it keeps in full space.
    got, want = merge(adapters, "core_" + method), merge(adapters, method)
    for path in SHAPES:
        assert rel_err(dense(got, path), dense(want, path)) < 1e-4, path


def numpy_cores(adapters, path):
    """Independent cores: numpy's SVD bases of the stacked factors (float64) and each task's
    dense update projected on them, `M_t = U_a^T dW_t U_b`."""
    nodes = [lora.get_at(a, path) for a in adapters]
    a = np.concatenate([np.asarray(n["lora_a"], np.float64) for n in nodes], 1)
    b = np.concatenate([np.asarray(n["lora_b"], np.float64) for n in nodes], 0)
    u_a = np.linalg.svd(a, full_matrices=False)[0]
    u_b = np.linalg.svd(b.T, full_matrices=False)[0]
    deltas = [np.asarray(lora.delta_of(n), np.float64) for n in nodes]
    return [u_a.T @ d @ u_b for d in deltas], u_a, u_b


@pytest.mark.parametrize("method", CORE_METHODS)
def test_each_method_is_itself_on_the_projected_deltas(method):
    """`core_<m>` = U_a m(M_1 ... M_T) U_b^T with the cores given to `m` as dense updates
    (`lora_a = M_t`, `lora_b = I`). Signs of numpy's singular vectors may differ from jax's:
    every method here is equivariant under them. (Every target in one tree: DARE draws the
    masks of all targets from one key.)"""
    params = {"steps": 40} if method == "wudi" else {}
    got = merge(MIXED, "core_" + method, **params)
    as_adapters, bases = [{} for _ in MIXED], {}
    for path in SHAPES:
        cores, u_a, u_b = numpy_cores(MIXED, path)
        bases[path] = (u_a, u_b)
        for t, core in enumerate(cores):
            node = {
                "lora_a": jnp.asarray(core, jnp.float32),
                "lora_b": jnp.eye(core.shape[1], dtype=jnp.float32),
                "scale": jnp.float32(1.0),
            }
            as_adapters[t] = lora.set_at(as_adapters[t], path, node)
    merged_cores = merge(as_adapters, method, **params)
    for path, (u_a, u_b) in bases.items():
        want = u_a @ dense(merged_cores, path) @ u_b.T
        assert rel_err(dense(got, path), want) < 1e-4, path


@pytest.mark.parametrize("method", ["ties_delta", "breadcrumbs", "wudi"])
def test_the_result_has_rank_at_most_the_sum_of_ranks(method):
    params = {"steps": 40} if method == "wudi" else {}
    singular = np.linalg.svd(dense(merge(MIXED, "core_" + method, **params)), compute_uv=False)
    assert (singular[9:] < 1e-5 * singular[0]).all()
    if method != "wudi":  # in full space the elementwise masks leave a full-rank update
        full = np.linalg.svd(dense(merge(MIXED, method, **params)), compute_uv=False)
        assert (full[9:] > 1e-3 * full[0]).any()


def test_the_bases_do_not_depend_on_the_order_of_the_tasks():
    # SVD bases of the stacked factors are invariant under reordering the tasks; a QR's are not.
    order = [2, 0, 1]
    got = merging.merge([MIXED[i] for i in order], "core_ties_delta", [WEIGHTS[i] for i in order])
    assert rel_err(dense(got), dense(merge(MIXED, "core_ties_delta"))) < 1e-4


def test_factored_output_keeps_every_direction_by_default():
    factored = merge(MIXED, "core_tsv", output="factored")
    assert lora.ranks(factored) == {QUERY: 9, VALUE: 6}  # min(in, out, R)
    assert rel_err(dense(factored), dense(merge(MIXED, "core_tsv"))) < 1e-5


def test_parameters_are_the_methods_own_and_checked():
    assert merging.METHODS["core_ties_delta"].params == merging.METHODS["ties_delta"].params
    assert merging.METHODS["core_dare_delta"].needs_key
    with pytest.raises(ValueError, match="density: got 1.5"):
        merge(MIXED, "core_ties_delta", density=1.5)
