"""Parity of jaxmerge.merging with PEFT 0.21's `add_weighted_adapter` on golden files.

The goldens (tests/golden/merges.json, outputs.npz, adapters/) come from scripts/make_golden.py
(PyTorch + PEFT); this test needs neither. Each deterministic case must reproduce PEFT's merged
update `dW = (scaling * B @ A).T` within 1e-4 of max |dW|.

With `svd_clamp`, PEFT clamps the factors of LAPACK's SVD, whose singular-vector signs are
arbitrary (they change the signed quantile). jaxmerge fixes its own signs, so for those cases the
test checks that some choice of signs of the unclamped rank-r factors, clamped by
`factorize.clamp_factors`, gives PEFT's dW: the numerics up to the sign convention.
"""

import itertools
import json
import os

import golden_files
import numpy as np
import pytest

from jaxmerge import lora, merging
from jaxmerge.interop import peft as peft_io
from jaxmerge.merging import factorize as fz
from jaxmerge.merging import ops as mu

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
MERGES_JSON = os.path.join(GOLDEN, "merges.json")
RTOL = 1e-4

pytestmark = pytest.mark.skipif(
    not os.path.exists(MERGES_JSON),
    reason="tests/golden/merges.json is missing: run scripts/make_golden.py (torch + peft)",
)


def load_cases():
    if not os.path.exists(MERGES_JSON):
        return []
    with open(MERGES_JSON) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def golden():
    return golden_files.arrays()


@pytest.fixture(scope="module")
def adapters():

    folder = os.path.join(GOLDEN, "adapters")
    return {
        name: peft_io.load_peft_adapter(os.path.join(folder, name))[0]
        for name in os.listdir(folder)
    }


def merge_params(case):
    """The case's PEFT arguments that the jaxmerge method takes (PEFT ignores the others)."""
    allowed = merging.METHODS[case["combination_type"]].params
    fields = ("svd_rank", "svd_clamp", "density", "majority_sign_method")
    return {f: case[f] for f in fields if f in allowed and case.get(f) is not None}


def golden_deltas(golden, name):
    prefix = f"merge/{name}/delta/"
    return {key[len(prefix) :]: value for key, value in golden.items() if key.startswith(prefix)}


def relative_error(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def best_sign_error(node, clamp, want):
    """The smallest error over the 2^r sign flips of the singular pairs, clamped like PEFT."""
    a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
    errors = []
    for signs in itertools.product([1.0, -1.0], repeat=a.shape[1]):
        signs = np.asarray(signs, np.float32)
        clamped_a, clamped_b = fz.clamp_factors(a * signs, b * signs[:, None], clamp)
        errors.append(relative_error(mu.matmul(clamped_a, clamped_b), want))
    return min(errors)


DETERMINISTIC = [
    case for case in load_cases() if not merging.METHODS[case["combination_type"]].needs_key
]


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[case["name"] for case in DETERMINISTIC])
def test_merge_matches_peft(case, golden, adapters):
    params = merge_params(case)
    inputs = [adapters[name] for name in case["adapters"]]
    merged = merging.merge(inputs, case["combination_type"], case["weights"], **params)
    want = golden_deltas(golden, case["name"])
    assert want and sorted(want) == [path for path, _ in lora.target_items(merged)]
    clamp = params.pop("svd_clamp", None)
    if clamp is not None and len(inputs) > 1:
        merged = merging.merge(inputs, case["combination_type"], case["weights"], **params)
    for path, node in lora.target_items(merged):
        if clamp is not None and len(inputs) > 1:
            assert node["lora_a"].shape[1] <= 10, "too many sign patterns to search"
            error = best_sign_error(node, clamp, want[path])
        else:
            error = relative_error(lora.delta_of(node), want[path])
        assert error <= RTOL, f"{path}: relative error {error:.2e}"


def test_golden_cases_cover_every_deterministic_peft_method():
    covered = {case["combination_type"] for case in DETERMINISTIC}
    covered |= {"svd_clamp"} if any(c.get("svd_clamp") for c in DETERMINISTIC) else set()
    signs = {c["majority_sign_method"] for c in DETERMINISTIC if "ties" in c["combination_type"]}
    wanted = {"cat", "linear", "svd", "svd_clamp", "ties", "ties_svd", "magnitude_prune"}
    assert wanted | {"magnitude_prune_svd"} <= covered and signs == {"total", "frequency"}
