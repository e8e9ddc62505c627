"""Iso-C, Iso-CTS and TSV-M (`merging.spectral`): FusionBench 0.2.33's numbers where every span
has full rank (golden file from scripts/make_golden_spectral.py), closed forms at LoRA ranks
(numpy's dense SVD), and the span's invariants. Every registry-wide invariant (jit = eager,
dtypes, zero adapters, non-finite inputs) runs in test_merge.py and test_bad_inputs.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import lora, merging
from tests.golden_files import arrays, rel_err

GOLDEN = arrays("spectral.npz")
CASES = sorted({key.split("/")[0] for key in GOLDEN})
# golden key suffix -> (method, parameters)
VARIANTS = {
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "iso_cts_0.5": ("iso_cts", {"common_space_fraction": 0.5}),
    "tsv": ("tsv", {}),
}
PATH = "block_0/attention/query"


def golden_adapters(case):
    adapters, index = [], 0
    while f"{case}/{index}/{PATH}/lora_a" in GOLDEN:
        prefix, adapter = f"{case}/{index}/", {}
        paths = sorted({k[len(prefix) :].rsplit("/", 1)[0] for k in GOLDEN if k.startswith(prefix)})
        for path in paths:
            node = {name: jnp.asarray(GOLDEN[prefix + path + "/" + name]) for name in lora.FACTORS}
            adapter = lora.set_at(adapter, path, node)
        adapters.append(adapter)
        index += 1
    return adapters


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_equals_fusionbench_where_the_spans_have_full_rank(case, variant):
    method, params = VARIANTS[variant]
    weights = [float(w) for w in GOLDEN[f"{case}/weights"]]
    merged = merging.merge(golden_adapters(case), method, weights, **params)
    for path, node in lora.target_items(merged):
        error = rel_err(node["delta"], GOLDEN[f"{case}/{variant}/{path}"])
        assert error < 1e-4, (path, error)


def lowrank_adapter(seed, rank, shape=(24, 20), rows=None, cols=None):
    """One-target adapter of rank `rank`; `rows`/`cols` confine a and b to those coordinates."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((shape[0], rank)) / np.sqrt(shape[0])
    b = rng.standard_normal((rank, shape[1])) * 0.1
    if rows is not None:
        a[np.setdiff1d(np.arange(shape[0]), rows)] = 0.0
        b[:, np.setdiff1d(np.arange(shape[1]), cols)] = 0.0
    node = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    return lora.set_at({}, PATH, {**node, "scale": jnp.float32(2.0)})


def dense(tree):
    return np.asarray(lora.delta_of(lora.get_at(tree, PATH)), np.float64)


def flat_spectrum(matrix, rank):
    """`mean(s) U V^T` over the `rank` leading pairs of numpy's SVD of `matrix`."""
    u, s, vh = np.linalg.svd(matrix)
    return s[:rank].mean() * u[:, :rank] @ vh[:rank]


LOW = [lowrank_adapter(seed, rank) for seed, rank in ((10, 3), (11, 4), (12, 2))]  # R = 9 < 20


def test_iso_c_at_lora_rank_flattens_the_sums_nonzero_spectrum():
    weights = [0.5, 1.0, -2.0]
    total = sum(w * dense(a) for w, a in zip(weights, LOW))
    got = dense(merging.merge(LOW, "iso_c", weights))
    assert rel_err(got, flat_spectrum(total, 9)) < 1e-4


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_one_adapter_keeps_its_vectors_with_the_mean_singular_value(method):
    # Iso-CTS with one task: the common space plus the task's own rest is every direction.
    got = dense(merging.merge(LOW[1:2], method))
    assert rel_err(got, flat_spectrum(dense(LOW[1]), 4)) < 1e-4


def test_tsv_of_one_adapter_is_the_adapter():
    assert rel_err(dense(merging.merge(LOW[1:2], "tsv")), dense(LOW[1])) < 1e-4


def test_tsv_of_orthogonal_tasks_is_their_sum():
    # Disjoint input and output coordinates: the tasks' singular vectors are already orthogonal.
    blocks = [
        (range(0, 8), range(0, 6)),
        (range(8, 16), range(6, 13)),
        (range(16, 24), range(13, 20)),
    ]
    tasks = [lowrank_adapter(20 + i, 3, rows=r, cols=c) for i, (r, c) in enumerate(blocks)]
    want = sum(dense(t) for t in tasks)
    assert rel_err(dense(merging.merge(tasks, "tsv")), want) < 1e-4


def test_a_zero_adapter_changes_nothing():
    zero = lora.zeros_like_adapter(LOW[0])
    for method in ("iso_c", "tsv"):  # Iso-CTS splits its directions by the number of tasks
        got = dense(merging.merge([*LOW[:2], zero], method))
        assert rel_err(got, dense(merging.merge(LOW[:2], method))) < 1e-4, method


def test_results_do_not_depend_on_how_the_updates_are_factored():
    # a -> a M, b -> M^-1 b keeps every dW_i; the methods see only the span and the cores.
    mixing = np.random.default_rng(5).standard_normal((4, 4)) + 3 * np.eye(4)
    node = lora.get_at(LOW[1], PATH)
    refactored = lora.set_at(
        {},
        PATH,
        {
            "lora_a": node["lora_a"] @ jnp.asarray(mixing, jnp.float32),
            "lora_b": jnp.asarray(np.linalg.solve(mixing, np.asarray(node["lora_b"])), jnp.float32),
            "scale": node["scale"],
        },
    )
    for method in ("iso_c", "iso_cts", "tsv"):
        got = dense(merging.merge([LOW[0], refactored, LOW[2]], method))
        assert rel_err(got, dense(merging.merge(LOW, method))) < 1e-4, method


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    got = dense(merging.merge(LOW, "iso_cts", common_space_fraction=1.0))
    assert rel_err(got, dense(merging.merge(LOW, "iso_c"))) < 1e-4


@pytest.mark.parametrize("method", ["iso_cts", "tsv"])
def test_scale_and_factored_output(method):
    delta = dense(merging.merge(LOW, method))
    assert rel_err(dense(merging.merge(LOW, method, scale=-0.5)), -0.5 * delta) < 1e-6
    factored = merging.merge(LOW, method, output="factored")  # every direction: exact
    assert rel_err(dense(factored), delta) < 1e-4


@pytest.mark.parametrize(
    ("dim", "tasks", "fraction", "split"),
    [(768, 3, 0.8, (615, 51)), (20, 6, 0.8, (14, 1)), (14, 6, 0.8, (14, 0)), (11, 3, 0.0, (2, 3))],
)
def test_common_and_task_dims_follow_fusionbench(dim, tasks, fraction, split):
    # (14, 6): round(3 / 6) is 0 (Python rounds half to even); (11, 3, 0): FusionBench's split
    # would take 12 task directions of 11, so one round of 3 fewer.
    assert merging.spectral.common_and_task_dims(dim, tasks, fraction) == split


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", True, None])
def test_bad_common_space_fraction_is_named(value):
    with pytest.raises(
        ValueError, match=r"common_space_fraction: got .*; allowed: a number in \[0, 1\]"
    ):
        merging.merge(LOW, "iso_cts", common_space_fraction=value)
