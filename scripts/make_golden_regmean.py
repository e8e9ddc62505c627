"""Writes tests/golden/regmean.npz: FusionBench 0.2.33's RegMean and RegMean++ closed forms on
seeded Gram matrices and weights, for tests/test_regmean.py.

Run from the repository root in a throwaway virtualenv (never the project's):

    python3 -m venv /work/venv-regmean
    /work/venv-regmean/bin/pip install torch==2.13.0 fusion-bench==0.2.33 numpy
    /work/venv-regmean/bin/python scripts/make_golden_regmean.py

Each case `<case>` holds, float32:
  <case>/grams     (T, in, in) each task's mean Gram X_i^T X_i / N_i of random inputs whose
                   features have very different scales (so the solve's scaling matters);
  <case>/base      (in, out) the shared kernel W_0, jaxmerge's (in, out) layout;
  <case>/deltas    (T, in, out) each task's update dW_i;
  <case>/ratio     () FusionBench's reduce_non_diagonal_ratio;
  <case>/regmean   (in, out) FusionBench `regmean.merging_with_regmean_weights` on the full
                   weights W_0 + dW_i (given in torch's (out, in) layout, weight_transpose=True),
                   minus W_0: the merged update;
  <case>/plusplus  (in, out) the same through RegMean++'s `regmean_params_merge`, minus W_0.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fusion_bench.method.regmean import regmean as fb_regmean
from fusion_bench.method.regmean_plusplus import regmean_plusplus as fb_plusplus

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden")
# name: (tasks, in, out, rows per task, ratio); ratios: FusionBench's CLIP default 0.95, its
# GPT-2 default 0.6, and no reduction at all.
CASES = {
    "clip_default": (3, 16, 12, 200, 0.95),
    "gpt2_ratio": (2, 24, 8, 300, 0.6),
    "no_reduction": (4, 12, 20, 150, 1.0),
}


def case(rng, tasks, n_in, n_out, rows, ratio):
    scales = np.exp(rng.uniform(-1.5, 1.5, n_in))  # features of very different magnitudes
    grams = []
    for _ in range(tasks):
        mixing = np.eye(n_in) + 0.5 * rng.standard_normal((n_in, n_in))
        x = (rng.standard_normal((rows, n_in)) @ mixing) * scales + rng.standard_normal(n_in)
        grams.append(x.T @ x / rows)
    grams = np.stack(grams).astype(np.float32)
    base = (0.5 * rng.standard_normal((n_in, n_out))).astype(np.float32)
    deltas = (0.1 * rng.standard_normal((tasks, n_in, n_out))).astype(np.float32)
    weights = [torch.tensor(base + d).T.contiguous() for d in deltas]  # torch's (out, in)
    torch_grams = [torch.tensor(g) for g in grams]
    merged = fb_regmean.merging_with_regmean_weights(
        {"layer.weight": weights},
        [{"layer": g} for g in torch_grams],
        reduce_non_diagonal_ratio=ratio,
        weight_transpose=True,
    )["layer.weight"]
    plusplus = fb_plusplus.regmean_params_merge(
        weights, torch_grams, reduce_non_diagonal_ratio=ratio, weight_transpose=True
    )
    return {
        "grams": grams,
        "base": base,
        "deltas": deltas,
        "ratio": np.float32(ratio),
        "regmean": merged.T.numpy() - base,
        "plusplus": plusplus.T.numpy() - base,
    }


def main():
    rng = np.random.default_rng(20)
    arrays = {}
    for name, spec in CASES.items():
        for key, value in case(rng, *spec).items():
            arrays[f"{name}/{key}"] = np.asarray(value, np.float32)
    path = os.path.join(OUT, "regmean.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
