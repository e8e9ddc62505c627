"""Speed of every registered merge method on ViT-B/16-shaped adapters, beside PEFT's.

    python benchmarks/merge_speed.py [--repeats 5] [--methods svd,ties] [--json] [--no-peft]
    python benchmarks/merge_speed.py --fusionbench /work/venv-iso/bin/python [--rounds 3]
    python benchmarks/merge_speed.py --fusionbench PYTHON --methods wudi --blocks 2 --repeats 1

Three adapters, 12 blocks with query and value targets of width 768, rank 16, random nonzero
factors. For each method of `jaxmerge.merging.METHODS` it reports the first call (compile
included) and the steady state (median of `--repeats` calls, `block_until_ready`). When torch
and peft import, PEFT's `add_weighted_adapter` runs the same method on the same factors (a
torch module of 12 blocks of q/v `nn.Linear(768, 768)` under `get_peft_model`). `--json`
prints one line {method: jaxmerge steady-state seconds}.

`--fusionbench PYTHON` compares `iso_c`, `iso_cts` and `tsv` (or `--methods`, `wudi` among
them) with FusionBench's own functions on the same task vectors: the factors go to a temporary
file, and each round runs jaxmerge (this script with --json) and FusionBench
(`fusionbench_merge_speed.py` under PYTHON, a virtualenv with torch and fusion-bench) in
processes of their own, in alternating order; the table gives medians over `--rounds` and the
load averages before and after. `--blocks` sets the number of q/v blocks (default 12).

Where OPENBLAS_CORETYPE is set in the environment (this project's CI machines set it to
Haswell), the LAPACK that jax takes from scipy's OpenBLAS runs older kernels: the header names
the kernel in use, and `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...` measures the
machine's own speed. Measured tables: `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import lora, merging


def openblas_kernel() -> str:
    """The OpenBLAS core type LAPACK calls run on (threadpoolctl), e.g. 'SkylakeX'."""
    try:
        import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jax's LAPACK uses)
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    cores = {
        i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"
    }
    return ", ".join(sorted(c for c in cores if c)) or "unknown"


ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
ARGS.add_argument("--methods", default="", help="comma-separated subset (default: all)")
ARGS.add_argument("--json", action="store_true", help="print one JSON line only")
ARGS.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
ARGS.add_argument("--fusionbench", default="", help="python of a venv with fusion-bench")
ARGS.add_argument("--rounds", type=int, default=3, help="alternated rounds with --fusionbench")
ARGS.add_argument(
    "--blocks", type=int, default=12, help="ViT blocks of q/v targets (fewer for wudi's 300 steps)"
)
FUSIONBENCH_METHODS = "iso_c,iso_cts,tsv"

WIDTH, DEPTH, RANK, ALPHA, TASKS = 768, 12, 16, 16.0, 3
WEIGHTS = [0.5, 0.3, 0.2]
DENSITY = 0.5


def random_factors(seed: int, depth: int = DEPTH) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{jaxmerge path: (a (in, r), b (r, out))} of one task, nonzero and of LoRA-like size."""
    rng = np.random.default_rng(seed)
    factors = {}
    for block in range(depth):
        for name in ("query", "value"):
            a = (rng.standard_normal((WIDTH, RANK)) / np.sqrt(WIDTH)).astype(np.float32)
            b = (rng.standard_normal((RANK, WIDTH)) * 0.01).astype(np.float32)
            factors[f"block_{block}/attention/{name}"] = (a, b)
    return factors


def to_adapter(factors) -> lora.Tree:
    adapter = {}
    for path, (a, b) in factors.items():
        node = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
        adapter = lora.set_at(adapter, path, {**node, "scale": jnp.float32(ALPHA / RANK)})
    return adapter


def method_params(method: str) -> dict:
    params = merging.METHODS[method].params
    return {"density": DENSITY} if params.get("density") is inspect.Parameter.empty else {}


def time_calls(call, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def time_jaxmerge(adapters, method: str, repeats: int) -> tuple[float, float]:
    key = jax.random.key(0)
    params = method_params(method)
    return time_calls(
        lambda: jax.block_until_ready(merging.merge(adapters, method, WEIGHTS, key=key, **params)),
        repeats,
    )


def peft_model(task_factors, depth: int = DEPTH):
    """A PEFT model of `depth` blocks of q/v Linear(768, 768) holding the tasks' factors."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))

    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=["q", "v"])
    model = get_peft_model(Encoder(), LoraConfig(**config), adapter_name="task0")
    for index in range(1, TASKS):
        model.add_adapter(f"task{index}", LoraConfig(**config))
    for index, factors in enumerate(task_factors):
        for block in range(depth):
            for name, module in (("query", "q"), ("value", "v")):
                layer = getattr(model.base_model.model.blocks[block], module)
                a, b = factors[f"block_{block}/attention/{name}"]
                layer.lora_A[f"task{index}"].weight.data = torch.from_numpy(a.T.copy())
                layer.lora_B[f"task{index}"].weight.data = torch.from_numpy(b.T.copy())
    return model


def time_peft(model, method: str, repeats: int) -> tuple[float, float]:
    names = [f"task{index}" for index in range(TASKS)]
    params = method_params(method)

    def call():
        model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=method, **params)
        model.delete_adapter("merged")

    return time_calls(call, repeats)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_factors(task_factors, path: str) -> None:
    """The tasks' factors, scale and the merge weights, for FusionBench's process."""
    arrays = {"weights": np.asarray(WEIGHTS, np.float32)}
    for index, factors in enumerate(task_factors):
        for target, (a, b) in factors.items():
            arrays[f"{index}/{target}/lora_a"], arrays[f"{index}/{target}/lora_b"] = a, b
            arrays[f"{index}/{target}/scale"] = np.float32(ALPHA / RANK)
    np.savez(path, **arrays)


def compare_with_fusionbench(args) -> None:
    """Alternated rounds of jaxmerge and FusionBench, each in a fresh process."""
    methods = args.methods or FUSIONBENCH_METHODS
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "factors.npz")
        save_factors([random_factors(seed, args.blocks) for seed in range(TASKS)], path)
        blocks = ["--blocks", str(args.blocks)]
        sides = {
            "jaxmerge": [sys.executable, os.path.abspath(__file__), "--json", *blocks],
            "fusionbench": [
                args.fusionbench,
                os.path.join(here, "fusionbench_merge_speed.py"),
                path,
            ],
        }
        runs = {side: [] for side in sides}
        loads = [os.getloadavg()]
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
            for side in order:
                command = [*sides[side], "--methods", methods, "--repeats", str(args.repeats)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs[side].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg())
    print(
        f"jaxmerge vs FusionBench: {TASKS} adapters, {args.blocks} blocks x q/v, width {WIDTH}, "
        f"r={RANK}, medians over {args.rounds} alternated rounds of the median of "
        f"{args.repeats} calls; load averages (1, 5, 15 min) before and after each round: "
        + "; ".join("/".join(f"{x:.1f}" for x in load) for load in loads)
    )
    print("| method | jaxmerge (s) | FusionBench (s) | FusionBench per layer (s) | speedup |")
    print("|---|---|---|---|---|")
    for method in methods.split(","):
        ours = statistics.median(run[method] for run in runs["jaxmerge"])
        theirs = statistics.median(run[method] for run in runs["fusionbench"])
        per_layer = theirs / (2 * args.blocks)
        print(f"| {method} | {ours:.4f} | {theirs:.3f} | {per_layer:.3f} | {theirs / ours:.1f}x |")


def main(argv=None) -> None:
    args = ARGS.parse_args(argv)
    if args.fusionbench:
        compare_with_fusionbench(args)
        return
    methods = [m for m in args.methods.split(",") if m] or sorted(merging.METHODS)
    task_factors = [random_factors(seed, args.blocks) for seed in range(TASKS)]
    adapters = [to_adapter(factors) for factors in task_factors]
    use_peft = not args.no_peft and not args.json and peft_available()
    model = peft_model(task_factors, args.blocks) if use_peft else None
    rows, steady = [], {}
    for method in methods:
        first, median = time_jaxmerge(adapters, method, args.repeats)
        steady[method] = median
        peft_cell, speedup = "-", "-"
        if model is not None and merging.METHODS[method].peft:
            _, peft_median = time_peft(model, method, args.repeats)
            peft_cell, speedup = f"{peft_median:.4f}", f"{peft_median / median:.1f}x"
        rows.append(f"| {method} | {first:.3f} | {median:.4f} | {peft_cell} | {speedup} |")
    if args.json:
        print(json.dumps(steady))
        return
    shape = f"{TASKS} adapters, {args.blocks} blocks x q/v, width {WIDTH}, r={RANK}"
    print(
        f"merge speed: {shape}, {jax.devices()[0].platform}, median of {args.repeats}, "
        f"OpenBLAS kernel {openblas_kernel()}"
    )
    if not use_peft:
        print("PEFT not installed (or --no-peft): no comparison")
    print("| method | jaxmerge first call (s) | jaxmerge steady (s) | PEFT steady (s) | speedup |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
