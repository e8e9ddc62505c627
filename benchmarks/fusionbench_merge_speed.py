"""FusionBench's side of `merge_speed.py --fusionbench PYTHON`: its own Iso-C, Iso-CTS, TSV-M
and WUDI timed on the task vectors of a factors file, in a process of its own (torch, no jax).

    PYTHON benchmarks/fusionbench_merge_speed.py FACTORS.npz --methods iso_c,tsv --repeats 2

FACTORS.npz holds, per task i and target path, `<i>/<path>/lora_a` (in, r), `lora_b` (r, out),
`scale` and `weights`; each task vector is `w_i * scale * (a @ b)^T` in FusionBench's (out, in)
layout, float32, formed before the clock starts. Prints one JSON line {method: median seconds
of `--repeats` calls after a first one} for the whole set of targets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time

import numpy as np
import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)
from fusion_bench.method.wudi.wudi import wudi_merging

METHODS = {
    "iso_c": lambda tvs: iso_c(tvs, accelerator="cpu"),
    "iso_cts": lambda tvs: iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
    "tsv": lambda tvs: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
    "wudi": lambda tvs: wudi_merging(tvs, accelerator="cpu"),  # 300 Adam steps, lr 1e-5
}


def task_vectors(path: str):
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    weights = data["weights"]
    vectors = []
    for index, weight in enumerate(weights):
        prefix, vector = f"{index}/", {}
        paths = sorted({k[len(prefix) :].rsplit("/", 1)[0] for k in data if k.startswith(prefix)})
        for target in paths:
            a, b = data[f"{prefix}{target}/lora_a"], data[f"{prefix}{target}/lora_b"]
            delta = float(weight) * float(data[f"{prefix}{target}/scale"]) * (a @ b)
            vector[target] = torch.from_numpy(np.ascontiguousarray(delta.T, np.float32))
        vectors.append(vector)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("factors")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    vectors = task_vectors(args.factors)
    steady = {}
    for method in args.methods.split(","):
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # a printed line per target
                METHODS[method](vectors)
            times.append(time.perf_counter() - start)
        steady[method] = statistics.median(times[1:])
    print(json.dumps(steady))


if __name__ == "__main__":
    main()
