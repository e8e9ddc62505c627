"""Training and evaluation speed of the ViT-Ti-like LoRA config, against the matmul peak.

    python benchmarks/train_speed.py [--devices 2] [--batch 128] [--steps 20] [--json] [--torch]

Model: dim 192, depth 12, 3 heads, MLP 768, 32x32x3 input, patch 4 (65 tokens), LoRA r=8 on
query and value, a 2-layer head, batch 128. It times jaxmerge's own jitted train step (the one
`train.py` runs, sharded over a ('data',) mesh of `--devices` CPU devices) and eval step, counts
FLOPs with XLA's cost analysis, and divides by the f32 matmul peak measured in the same run.
`--torch` also times PyTorch + PEFT on the same model when torch and peft are importable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--devices", type=int, default=2, help="CPU devices (one per core is best)")
ARGS.add_argument("--batch", type=int, default=128)
ARGS.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
ARGS.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
ARGS.add_argument("--lora_compute", default="branch", choices=["branch", "fold"])
ARGS.add_argument("--json", action="store_true", help="print one JSON line only")
ARGS.add_argument("--torch", action="store_true", help="also time PyTorch + PEFT")


def matmul_peak_gflops(seconds: float = 2.0) -> float:
    """Measured f32 GFLOP/s of a large square matmul on all cores (one device)."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a).block_until_ready()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def jax_speed(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmerge import config_lib, data, heads, scoring, tasks, train
    from jaxmerge.models import vit

    config = config_lib.base_config()
    config.batch_size = args.batch
    config.model.dtype = args.dtype
    config.steps = 1000
    model = vit.ViT(
        **vit.variant("Ti/4", image_size=32),
        dtype=jnp.dtype(args.dtype),
        lora_compute=args.lora_compute,
    )
    base = vit.init_params(model, jax.random.key(0))
    head = heads.MlpHead(256, 10)
    task = tasks.Task("bench", "none", "classification", 10)
    optimizer = train.make_optimizer(config)
    mesh = data.data_mesh()
    replicated = NamedSharding(mesh, P())
    params = train.init_params(config, model, head, base, jax.random.key(1))
    state = jax.device_put(
        train.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params)), replicated
    )
    base = jax.device_put(base, replicated)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, args.batch).astype(np.int32),
        "mask": np.ones(args.batch, bool),
    }
    batch = data.shard_batch(batch, mesh)
    step_fn = train.make_train_step(model, head, task, optimizer)
    eval_fn = scoring.make_eval_step(model, head, task)
    key = jax.random.key(2)

    # XLA's cost analysis counts one device's share of the sharded program.
    devices = jax.device_count()
    train_flops = (
        devices * step_fn.lower(state, base, batch, key).compile().cost_analysis()["flops"]
    )
    eval_flops = (
        devices * eval_fn.lower(state.params, base, batch).compile().cost_analysis()["flops"]
    )

    for _ in range(3):
        state, metrics = step_fn(state, base, batch, key)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step_fn(state, base, batch, key)
        if i % 5 == 4:
            jax.block_until_ready(metrics)  # see train.MAX_STEPS_WITHOUT_SYNC
    jax.block_until_ready(metrics)
    train_s = (time.perf_counter() - start) / args.steps

    for _ in range(3):
        out = eval_fn(state.params, base, batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for i in range(args.steps):
        out = eval_fn(state.params, base, batch)
        if i % 5 == 4:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    eval_s = (time.perf_counter() - start) / args.steps
    return {
        "train_images_per_s": args.batch / train_s,
        "eval_images_per_s": args.batch / eval_s,
        "train_gflop_per_image": train_flops / args.batch / 1e9,
        "eval_gflop_per_image": eval_flops / args.batch / 1e9,
    }


def torch_speed(args) -> dict | None:
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=4,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(cfg)
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n in ("query", "value", "q_proj", "v_proj") if n in names]
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"]),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    def train_step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        optimizer.step()

    def timed(fn):
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - start) / args.steps

    model.train()
    train_s = timed(train_step)
    model.eval()
    with torch.no_grad():
        eval_s = timed(lambda: model(pixel_values=x))
    return {"train_images_per_s": args.batch / train_s, "eval_images_per_s": args.batch / eval_s}


def main():
    args = ARGS.parse_args()
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    )
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    peak = matmul_peak_gflops()
    result = jax_speed(args)
    result["matmul_peak_gflops"] = peak
    result["train_utilisation"] = (
        result["train_images_per_s"] * result["train_gflop_per_image"] / peak
    )
    result["eval_utilisation"] = result["eval_images_per_s"] * result["eval_gflop_per_image"] / peak
    reference = torch_speed(args) if args.torch else None
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
        return
    print(f"matmul peak (f32, now): {peak:.1f} GFLOP/s; devices: {args.devices}; {args.dtype}")
    print("| | train img/s | eval img/s | train util. | eval util. |")
    print("|---|---|---|---|---|")
    print(
        f"| jaxmerge | {result['train_images_per_s']:.1f} | {result['eval_images_per_s']:.1f} | "
        f"{result['train_utilisation']:.0%} | {result['eval_utilisation']:.0%} |"
    )
    if reference:
        train_ips, eval_ips = reference["train_images_per_s"], reference["eval_images_per_s"]
        print(
            f"| PyTorch + PEFT | {train_ips:.1f} | {eval_ips:.1f} | "
            f"{train_ips * result['train_gflop_per_image'] / peak:.0%} | "
            f"{eval_ips * result['eval_gflop_per_image'] / peak:.0%} |"
        )
    elif args.torch:
        print("PyTorch + PEFT: not installed in this interpreter")


if __name__ == "__main__":
    main()
