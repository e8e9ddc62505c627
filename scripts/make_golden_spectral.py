"""Writes tests/golden/spectral.npz: FusionBench's Iso-C, Iso-CTS and TSV-M on small adapters.

Run from the repository root in a throwaway virtualenv holding FusionBench (no jax needed):

    python3 -m venv /work/venv-iso
    /work/venv-iso/bin/pip install torch==2.13.0 fusion-bench==0.2.33
    /work/venv-iso/bin/python scripts/make_golden_spectral.py

Each case is a set of seeded LoRA adapters over a few targets, every span of full rank (the sum
of the ranks at least the layer's smaller side, and every task's rank at least the number of
pairs FusionBench keeps of it), so FusionBench's results are defined without arbitrary
null-space vectors and jaxmerge's span-restricted methods must equal them. FusionBench's own
functions (`isotropic_merging.iso_utils.iso_c`, `iso_cts`, `task_singular_vector.utils.
TSVM_utils.compute_and_sum_svd_mem_reduction`) get the dense task vectors
`w_i * scale_i * (a_i @ b_i)^T` in (out, in) layout, in float64, on the CPU.

Keys (float32 factors, float64 results in jaxmerge's (in, out) layout):
  <case>/weights                       (n,) the merge weights
  <case>/<i>/<path>/lora_a, lora_b, scale   adapter i's factors at <path>
  <case>/<method>/<path>               the merged update, <method> one of iso_c, iso_cts,
                                       iso_cts_0.5 (common_space_fraction 0.5), tsv
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden")

# name: (seed, {path: (in, out)}, ranks per adapter, weights). Sum of ranks >= min(in, out).
CASES = {
    "equal": (
        0,
        {
            "block_0/attention/query": (12, 12),
            "block_0/attention/value": (16, 12),
            "block_1/attention/query": (10, 16),
        },
        [8, 8, 8],
        [1.0, 1.0, 1.0],
    ),
    "mixed": (
        1,
        {"block_0/attention/query": (20, 14), "block_0/attention/value": (14, 20)},
        [6, 8, 10],
        [0.7, -0.4, 1.3],
    ),
    "pair": (2, {"block_0/attention/query": (10, 16), "block_0/mlp/fc1": (16, 10)}, [6, 6], None),
    "single": (3, {"block_0/attention/query": (8, 8)}, [8], None),
    "six": (4, {"block_0/attention/query": (24, 20)}, [4] * 6, None),
}


def adapters(seed, shapes, ranks):
    """One {path: (a, b, scale)} per rank: LoRA-sized random factors, scale alpha / r."""
    rng = np.random.default_rng(seed)
    out = []
    for rank in ranks:
        factors = {}
        for path, (fan_in, fan_out) in shapes.items():
            a = (rng.standard_normal((fan_in, rank)) / np.sqrt(fan_in)).astype(np.float32)
            b = (rng.standard_normal((rank, fan_out)) * 0.1).astype(np.float32)
            factors[path] = (a, b, np.float32(16.0 / rank))
        out.append(factors)
    return out


def quiet(fn, *args, **kwargs):
    """FusionBench prints a line per key; keep the script's own output readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def main() -> None:
    arrays = {}
    for name, (seed, shapes, ranks, weights) in CASES.items():
        weights = weights or [1.0] * len(ranks)
        tasks = adapters(seed, shapes, ranks)
        arrays[f"{name}/weights"] = np.asarray(weights, np.float32)
        task_vectors = []
        for index, (factors, weight) in enumerate(zip(tasks, weights)):
            vector = {}
            for path, (a, b, scale) in factors.items():
                arrays[f"{name}/{index}/{path}/lora_a"] = a
                arrays[f"{name}/{index}/{path}/lora_b"] = b
                arrays[f"{name}/{index}/{path}/scale"] = scale
                delta = weight * float(scale) * (a.astype(np.float64) @ b.astype(np.float64))
                vector[path] = torch.from_numpy(delta.T.copy())  # FusionBench's (out, in)
            task_vectors.append(vector)
        merged = {
            "iso_c": quiet(iso_c, task_vectors, accelerator="cpu"),
            "iso_cts": quiet(iso_cts, task_vectors, common_space_fraction=0.8, accelerator="cpu"),
            "iso_cts_0.5": quiet(
                iso_cts, task_vectors, common_space_fraction=0.5, accelerator="cpu"
            ),
            "tsv": quiet(compute_and_sum_svd_mem_reduction, task_vectors, accelerator="cpu"),
        }
        for method, vectors in merged.items():
            for path, value in vectors.items():
                arrays[f"{name}/{method}/{path}"] = value.numpy().T.astype(np.float64)
        print(f"{name}: {len(tasks)} adapters, targets {sorted(shapes)}")
    path = os.path.join(OUT, "spectral.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
