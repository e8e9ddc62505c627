"""Writes tests/golden/wudi.npz: FusionBench's own WUDI merge of small seeded LoRA adapters.

Run from the repository root in a throwaway virtualenv (no jax needed):

    python3 -m venv /work/venv-wudi
    /work/venv-wudi/bin/pip install torch==2.13.0 fusion-bench==0.2.33
    /work/venv-wudi/bin/python scripts/make_golden_wudi.py

Each adapter's task vector is built in torch, in FusionBench's (out, in) orientation, as
`scale * B @ A` with `A = lora_a^T` (r, in), `B = lora_b^T` (out, r), and the list of
`{key: task vector}` dicts goes to `fusion_bench.method.wudi.wudi.wudi_merging` on the CPU:
its own loss, optimiser and learning rate. Case "default" leaves `iter_num` at FusionBench's
default (the test holds jaxmerge's default `steps` to it); case "steps_40" passes 40.

The .npz holds, in jaxmerge's (in, out) layout, float32:
    task_<t>/<path>/lora_a   (in, r)     task t's factors (ranks differ between tasks)
    task_<t>/<path>/lora_b   (r, out)
    task_<t>/<path>/scale    ()
    <case>/steps             ()          the iter_num FusionBench ran (int)
    <case>/merged/<path>     (in, out)   FusionBench's merged task vector, transposed
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch
from fusion_bench.method.wudi.wudi import wudi_merging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "wudi.npz")
# Two layer shapes (one not square), three tasks of ranks 4, 2 and 3.
SHAPES = {"block_0/attention/query": (24, 16), "block_0/attention/value": (16, 20)}
RANKS = (4, 2, 3)
ALPHA = 8.0


def factors(seed: int, rank: int) -> dict[str, dict[str, np.ndarray]]:
    """LoRA-like factors: `lora_a` ~ N(0, 1/in), `lora_b` ~ N(0, 0.01^2), scale alpha / r, so
    an update's entries are about 0.01, and WUDI's 300 steps of at most 1e-5 visibly move them."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, (fan_in, fan_out) in SHAPES.items():
        out[path] = {
            "lora_a": (rng.standard_normal((fan_in, rank)) / np.sqrt(fan_in)).astype(np.float32),
            "lora_b": (0.01 * rng.standard_normal((rank, fan_out))).astype(np.float32),
            "scale": np.float32(ALPHA / rank),
        }
    return out


def task_vector(nodes) -> dict[str, torch.Tensor]:
    """{path: scale * B @ A} in torch's (out, in) layout."""
    return {
        path: float(n["scale"])
        * (torch.from_numpy(n["lora_b"].T) @ torch.from_numpy(n["lora_a"].T))
        for path, n in nodes.items()
    }


def main() -> None:
    tasks = [factors(10 + t, rank) for t, rank in enumerate(RANKS)]
    vectors = [task_vector(nodes) for nodes in tasks]
    arrays = {}
    for t, nodes in enumerate(tasks):
        for path, node in nodes.items():
            for name, value in node.items():
                arrays[f"task_{t}/{path}/{name}"] = np.asarray(value, np.float32)
    default_steps = inspect.signature(wudi_merging).parameters["iter_num"].default
    for case, kwargs in (("default", {}), ("steps_40", {"iter_num": 40})):
        merged = wudi_merging(vectors, accelerator="cpu", **kwargs)
        arrays[f"{case}/steps"] = np.asarray(kwargs.get("iter_num", default_steps))
        for path, value in merged.items():
            arrays[f"{case}/merged/{path}"] = value.detach().numpy().T.astype(np.float32)
            total = sum(v[path] for v in vectors).numpy().T
            moved = np.abs(arrays[f"{case}/merged/{path}"] - total).max() / np.abs(total).max()
            print(f"{case} {path}: moved {moved:.3g} of the sum's largest entry")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes), default iter_num {default_steps}")


if __name__ == "__main__":
    main()
