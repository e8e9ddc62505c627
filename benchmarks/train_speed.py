"""Training and evaluation speed of jaxmerge against PyTorch + PEFT, each in a process of its own.

    python benchmarks/train_speed.py --torch [--model ti|study|both] [--rounds 3] [--steps 20]
        [--torch_python /path/to/python] [--devices N] [--lora_compute branch|fold]

Two models, both with LoRA r=8 (alpha 8) on query and value and a 2-layer head (hidden 256,
10 classes), trained by AdamW with global-norm clipping on one fixed random batch:
  ti     the ViT-Ti-like config: dim 192, depth 12, 3 heads, MLP 768, 32x32x3, patch 4
         (65 tokens), batch 128;
  study  the offline study's config (experiments/configs/offline.py, the shipped base):
         dim 128, depth 6, 4 heads, MLP 512, 28x28x3, patch 7 (17 tokens), batch 64.

Each round starts one fresh process per side, jaxmerge's jitted train and eval steps (the ones
`training.py` and `scoring.py` run, on the device mesh the command-line entry points use) and
PyTorch + PEFT (`transformers.ViTForImageClassification`, its default attention), so neither
inherits the other's threads or allocator. The order flips every round (J T, T J, J T, ...);
the table gives each side's median and range over the rounds, and the ratio of the medians.
Compilation and warm-up steps are not timed. With `--torch`, PyTorch runs under
`--torch_python` (default: this interpreter, if it imports torch, transformers and peft).

`--side jax|torch` runs one side once in this process and prints one JSON line (what each
round's subprocess runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {
    # width, depth, heads, mlp, image, patch, batch
    "ti": dict(
        width=192, depth=12, num_heads=3, mlp_dim=768, image_size=32, patch_size=4, batch=128
    ),
    "study": dict(
        width=128, depth=6, num_heads=4, mlp_dim=512, image_size=28, patch_size=7, batch=64
    ),
}
HEAD_HIDDEN, CLASSES, RANK, ALPHA = 256, 10, 8, 8.0
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-3, 1e-4, 1.0

ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--model", default="both", choices=["ti", "study", "both"])
ARGS.add_argument("--rounds", type=int, default=3, help="processes per side, alternated")
ARGS.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
ARGS.add_argument("--batch", type=int, default=0, help="0: the model's own batch size")
ARGS.add_argument(
    "--devices", type=int, default=0, help="CPU devices for jaxmerge; 0: what the CLIs use"
)
ARGS.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
ARGS.add_argument("--lora_compute", default="branch", choices=["branch", "fold"])
ARGS.add_argument(
    "--malloc",
    default="reuse",
    choices=["reuse", "default"],
    help="reuse: the CLIs' cli.keep_freed_memory(); default: glibc's own settings",
)
ARGS.add_argument("--torch", action="store_true", help="also time PyTorch + PEFT")
ARGS.add_argument("--torch_python", default="", help="the python that runs PyTorch + PEFT")
ARGS.add_argument("--json", action="store_true", help="print the rounds as JSON lines only")
ARGS.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _timed(step, steps: int, sync) -> tuple[float, float]:
    """(wall, CPU) seconds per call of `step` after 3 warm-up calls; `sync` waits on its last
    result. The CPU seconds (all of this process's threads) are steadier than the wall seconds
    on a machine shared with other work."""
    for _ in range(3):
        out = step()
    sync(out)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        out = step()
        if i % 5 == 4:
            sync(out)  # multi-device CPU loops must wait now and then (train.MAX_STEPS_...)
    sync(out)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def jax_speed(shape: dict, batch_size: int, args) -> dict:
    """jaxmerge's train and eval steps on one fixed batch; images per second."""
    from jaxmerge import cli

    cli.split_cpu_into_devices(args.devices or cli.CPU_DEVICES)
    if args.malloc == "reuse":
        cli.keep_freed_memory()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmerge import config_lib, heads, input_pipeline, run_config, scoring, tasks, training
    from jaxmerge.models import vit

    config = config_lib.base_config()
    config.batch_size, config.steps = batch_size, 1000
    config.learning_rate, config.weight_decay = LEARNING_RATE, WEIGHT_DECAY
    config.grad_clip_norm = CLIP_NORM
    config.lora.rank, config.lora.alpha = RANK, ALPHA
    kwargs = {k: v for k, v in shape.items() if k != "batch"}
    model = vit.ViT(**kwargs, dtype=jnp.dtype(args.dtype), lora_compute=args.lora_compute)
    base = vit.init_params(model, jax.random.key(0))
    head = heads.MlpHead(HEAD_HIDDEN, CLASSES)
    task = tasks.Task("bench", "none", "classification", CLASSES)
    parts = run_config.of_saved(config)
    optimizer = training.make_optimizer(parts.optimizer)
    mesh = input_pipeline.data_mesh()
    replicated = NamedSharding(mesh, P())
    params = training.init_params(parts.lora, "lora", model, head, base, jax.random.key(1))
    state = jax.device_put(
        training.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params)), replicated
    )
    base = jax.device_put(base, replicated)
    rng = np.random.default_rng(0)
    size = shape["image_size"]
    batch = {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, CLASSES, batch_size).astype(np.int32),
        "mask": np.ones(batch_size, bool),
    }
    batch = input_pipeline.shard_batch(batch, mesh)
    step_fn = training.make_train_step(model, head, task, optimizer)
    eval_fn = scoring.make_eval_step(model, head, task)
    key = jax.random.key(2)
    # XLA's cost analysis counts one device's share of the sharded program.
    devices = jax.device_count()
    lowered = step_fn.lower(state, base, batch, key).compile()
    train_flops = devices * lowered.cost_analysis()["flops"]
    eval_flops = (
        devices * eval_fn.lower(state.params, base, batch).compile().cost_analysis()["flops"]
    )

    holder = [state]

    def train_step():
        holder[0], metrics = step_fn(holder[0], base, batch, key)
        return metrics

    train_s, train_cpu = _timed(train_step, args.steps, jax.block_until_ready)
    eval_s, eval_cpu = _timed(
        lambda: eval_fn(holder[0].params, base, batch), args.steps, jax.block_until_ready
    )
    return {
        "train_images_per_s": batch_size / train_s,
        "eval_images_per_s": batch_size / eval_s,
        "train_cpu_ms_per_image": 1e3 * train_cpu / batch_size,
        "eval_cpu_ms_per_image": 1e3 * eval_cpu / batch_size,
        "train_gflop_per_image": train_flops / batch_size / 1e9,
        "eval_gflop_per_image": eval_flops / batch_size / 1e9,
        "devices": devices,
    }


def torch_speed(shape: dict, batch_size: int, args) -> dict:
    """PyTorch + PEFT on the same model, head, optimizer and batch; images per second."""
    import math

    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=shape["width"],
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["mlp_dim"],
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        layer_norm_eps=1e-6,
        num_labels=CLASSES,
    )
    model = transformers.ViTForImageClassification(config)
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(shape["width"], HEAD_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HEAD_HIDDEN, CLASSES),
    )
    # transformers 4 names the projections query / value, transformers 5 q_proj / v_proj.
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n in ("query", "value", "q_proj", "v_proj") if n in names]
    lora = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, modules_to_save=["classifier"]
    )
    model = peft.get_peft_model(model, lora)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    # jaxmerge's schedule: linear warm-up, then cosine decay (evaluated every step on both sides).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, k / 30) * 0.5 * (1 + math.cos(math.pi * min(k, 1000) / 1000))
    )
    size = shape["image_size"]
    x = torch.randn(batch_size, 3, size, size)
    y = torch.randint(0, CLASSES, (batch_size,))

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP_NORM)
        optimizer.step()
        schedule.step()

    def eval_step():
        with torch.inference_mode():
            return model(pixel_values=x).logits

    model.train()
    train_s, train_cpu = _timed(train_step, args.steps, lambda _: None)
    model.eval()
    eval_s, eval_cpu = _timed(eval_step, args.steps, lambda _: None)
    return {
        "train_images_per_s": batch_size / train_s,
        "eval_images_per_s": batch_size / eval_s,
        "train_cpu_ms_per_image": 1e3 * train_cpu / batch_size,
        "eval_cpu_ms_per_image": 1e3 * eval_cpu / batch_size,
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
    }


def _torch_python(args) -> str:
    """The interpreter that runs PyTorch + PEFT; exits with a clear message if there is none."""
    python = args.torch_python or sys.executable
    probe = subprocess.run(
        [python, "-c", "import torch, transformers, peft"], capture_output=True, text=True
    )
    if probe.returncode:
        where = "--torch_python" if args.torch_python else "this interpreter"
        last = (probe.stderr.strip().splitlines() or ["not found"])[-1]
        sys.exit(
            f"error: {where} ({python}) cannot import torch, transformers and peft ({last}); "
            f"pass --torch_python PATH to a python that has them"
        )
    return python


def _run_side(side: str, python: str, model: str, args) -> dict:
    command = [python, os.path.abspath(__file__), "--side", side, "--model", model]
    command += ["--steps", str(args.steps), "--batch", str(args.batch)]
    command += ["--devices", str(args.devices), "--dtype", args.dtype]
    command += ["--lora_compute", args.lora_compute, "--malloc", args.malloc]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: the {side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall, CPU seconds every core of the machine spent busy, CPU seconds of this process's
    finished children). Their difference over a round is the work of *other* processes: the
    load average cannot tell it apart, as it counts the benchmark's own threads (8 device
    threads make a quiet 2-core machine read as load 3 to 6)."""
    with open("/proc/stat") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy time.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    children = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), children[2] + children[3]


def _other_cores(before, after) -> float:
    """Cores that other processes kept busy, on average, between two `_cpu_seconds()`."""
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall


def _cpu_name() -> str:
    """The CPU model: PyTorch's MKL runs AVX-512 kernels on Intel only, so the ratio depends on
    the vendor, not only on the core count (benchmarks/RESULTS.md)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main():
    args = ARGS.parse_args()
    models = ["ti", "study"] if args.model == "both" else [args.model]
    if args.side:
        shape = MODELS[args.model]
        batch = args.batch or shape["batch"]
        speed = jax_speed if args.side == "jax" else torch_speed
        print(json.dumps(speed(shape, batch, args)))
        return
    sides = [("jax", sys.executable)]
    if args.torch:
        sides.append(("torch", _torch_python(args)))
    for model in models:
        runs: dict[str, list[dict]] = {side: [] for side, _ in sides}
        loads, others = [_load()], []
        for round_ in range(args.rounds):
            start = _cpu_seconds()
            for side, python in sides if round_ % 2 == 0 else sides[::-1]:
                result = _run_side(side, python, model, args)
                runs[side].append(result)
                if args.json:
                    print(json.dumps({"model": model, "side": side, "round": round_, **result}))
            loads.append(_load())
            others.append(_other_cores(start, _cpu_seconds()))
        if args.json:
            continue
        shape = MODELS[model]
        jax_runs = runs["jax"]
        print(
            f"\n{model}: width {shape['width']}, depth {shape['depth']}, {shape['image_size']} px, "
            f"patch {shape['patch_size']}, batch {args.batch or shape['batch']}; "
            f"jaxmerge on {jax_runs[0]['devices']} CPU devices, {args.dtype}, "
            f"lora_compute={args.lora_compute}; {args.rounds} rounds; "
            f"XLA counts {jax_runs[0]['train_gflop_per_image']:.3f} GFLOP per training image"
        )
        print(f"{_cpu_name()}, {os.cpu_count()} cores")
        print(f"load before and after each round: {'; '.join(loads)}")
        print(
            "other processes' work during each round (cores busy, outside this benchmark): "
            + ", ".join(f"{o:.2f}" for o in others)
        )
        if max(others) > 0.25:
            # PyTorch's OpenMP threads meet at a barrier in every parallel region; on busy
            # cores each wait can cost a time slice, while jaxmerge's device threads do not
            # wait for each other: the ratio then grows with the load (RESULTS.md).
            print(
                f"warning: other processes kept {max(others):.2f} of {os.cpu_count()} cores "
                "busy; that slows PyTorch far more than jaxmerge: quote ratios from a quiet "
                "machine only"
            )
        print("| | train img/s, median (range) | eval img/s, median (range) |")
        print("|---|---|---|")
        for side, name in (("jax", "jaxmerge"), ("torch", "PyTorch + PEFT")):
            if side in runs:
                train = [r["train_images_per_s"] for r in runs[side]]
                evals = [r["eval_images_per_s"] for r in runs[side]]
                print(f"| {name} | {_summary(train)} | {_summary(evals)} |")
        if "torch" in runs:
            ratio = {
                k: statistics.median(r[k] for r in runs["jax"])
                / statistics.median(r[k] for r in runs["torch"])
                for k in ("train_images_per_s", "eval_images_per_s")
            }
            print(
                f"| jaxmerge / PyTorch | {ratio['train_images_per_s']:.2f}x | "
                f"{ratio['eval_images_per_s']:.2f}x |"
            )
            torch_run = runs["torch"][0]
            print(
                f"({torch_run['versions']}, {torch_run['threads']} threads, "
                f"{torch_run.get('capability', '?')} kernels)"
            )


if __name__ == "__main__":
    main()
