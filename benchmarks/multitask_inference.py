"""Multi-task inference time: one merged backbone for n tasks against one forward per adapter.

    python benchmarks/multitask_inference.py [--tasks 2,3,6] [--batch 256] [--repeats 20] [--json]
    python benchmarks/multitask_inference.py --variant B/16 --image_size 224 --batch 32

The paper's claim: after merging, n tasks need one ViT forward (the merged adapter folded into
the base) plus n small heads, where separate adapters need n forwards. Both paths are jitted and
compared on the same batch: `merged` is `multitask.make_predictor` (one forward, every head);
`separate` runs `multitask.make_single_task_predictor` once per task on that task's own
backbone (its adapter folded in, the cheapest way to serve one adapter). Default model: the
offline suite's base (`jaxmerge/assets/fashion_vit`, width 128, depth 6, patch 7, 28 px);
`--variant` times a named ViT with random weights instead. Times are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--tasks", default="2,3,6", help="comma-separated task counts")
ARGS.add_argument("--batch", type=int, default=256)
ARGS.add_argument("--repeats", type=int, default=20)
ARGS.add_argument("--variant", default="", help="e.g. B/16 (random weights); default: the base")
ARGS.add_argument("--image_size", type=int, default=224, help="with --variant")
ARGS.add_argument("--json", action="store_true", help="print one JSON line only")


def median_seconds(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_model(args):
    import jax

    from jaxmerge import run_config
    from jaxmerge.models import load, vit

    if args.variant:
        model = vit.ViT(**vit.variant(args.variant, image_size=args.image_size))
        return model, vit.init_params(model, jax.random.key(0))
    from experiments.configs import offline

    parts = run_config.of_saved(offline.get_config().train)
    model, base, _ = load.load_base(parts.model, parts.base)
    return model, base


def run(args) -> dict:
    import jax
    import numpy as np

    from jaxmerge import adapter_stack, fusion, heads, lora, merging, mixed_batch
    from jaxmerge.model_folder import multitask
    from jaxmerge.models import vit

    model, base = load_model(args)
    counts = [int(n) for n in args.tasks.split(",")]
    n_max = max(counts)
    config = lora.LoraConfig(rank=8, targets=vit.TARGET_PRESETS["qv"])
    adapters = []
    for i in range(n_max):  # non-zero updates; timings do not depend on the values
        adapter = lora.init_adapter(jax.random.key(i), base, config)
        adapters.append(lora.map_targets(lambda n: {**n, "lora_b": n["lora_b"] + 0.01}, adapter))
    head_defs = [heads.MlpHead(256, 10) for _ in range(n_max)]
    feature = np.zeros((1, model.width), np.float32)
    head_params = [
        h.init(jax.random.key(100 + i), feature)["params"] for i, h in enumerate(head_defs)
    ]
    size = model.image_size
    images = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)
    images = jax.device_put(images)
    single = multitask.make_single_task_predictor(model, head_defs[0])
    one_backbone = lora.fold_into_base(base, adapters[0])
    one_adapter_s = median_seconds(
        lambda: single(one_backbone, head_params[0], images), args.repeats
    )
    fused_forward = jax.jit(fusion.fused_forward, static_argnums=(0, 1))
    results = []
    for n in counts:
        names = [f"task{i}" for i in range(n)]
        merged = lora.fold_into_base(base, merging.merge(adapters[:n], "cat"))
        predict = multitask.make_predictor(model, dict(zip(names, head_defs[:n])))
        heads_n = dict(zip(names, head_params[:n]))
        backbones = [lora.fold_into_base(base, a) for a in adapters[:n]]
        merged_s = median_seconds(
            lambda p=predict, m=merged, h=heads_n: p(m, h, images), args.repeats
        )
        separate_s = median_seconds(
            lambda bs=backbones, hs=head_params[:n]: [single(b, h, images) for b, h in zip(bs, hs)],
            args.repeats,
        )
        stacked = adapter_stack.stack(adapters[:n])
        fused_s = {}
        for gating in ("router", "mixture"):  # non-zero routers, so no term is skipped
            gates = jax.tree.map(lambda x: x + 0.01, fusion.init_gates(stacked, gating))
            fused = fusion.fused_tree(stacked, gates, gating)
            fused_s[gating] = median_seconds(
                lambda t=fused, hd=tuple(head_defs[:n]), hp=head_params[:n]: fused_forward(
                    model, hd, base, t, hp, images
                ),
                args.repeats,
            )
        server = mixed_batch.make_server(
            model,
            base,
            dict(zip(names, adapters[:n])),
            {t: (h, p) for t, h, p in zip(names, head_defs, head_params)},
        )
        requests = [names[i % n] for i in range(args.batch)]
        mixed_s = median_seconds(lambda s=server, r=requests: s.forward(images, r), args.repeats)
        results.append(
            {
                "tasks": n,
                "merged_ms": round(1e3 * merged_s, 2),
                "separate_ms": round(1e3 * separate_s, 2),
                "speedup": round(separate_s / merged_s, 2),
                "merged_images_per_s": round(args.batch / merged_s, 1),
                "fused_router_ms": round(1e3 * fused_s["router"], 2),
                "fused_router_over_merged": round(fused_s["router"] / merged_s, 2),
                "fused_mixture_ms": round(1e3 * fused_s["mixture"], 2),
                "fused_mixture_over_merged": round(fused_s["mixture"] / merged_s, 2),
                "mixed_ms": round(1e3 * mixed_s, 2),
                "one_adapter_ms": round(1e3 * one_adapter_s, 2),
                "mixed_over_one_adapter_images_per_s": round(one_adapter_s / mixed_s, 2),
            }
        )
    return {
        "model": args.variant or "fashion_vit",
        "image_size": size,
        "batch": args.batch,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "results": results,
    }


def main():
    args = ARGS.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"model {out['model']} at {out['image_size']} px, batch {out['batch']}, {out['devices']}")
    columns = ("tasks", "merged_ms", "separate_ms", "speedup", "fused_router_ms")
    columns += ("fused_router_over_merged", "fused_mixture_ms", "fused_mixture_over_merged")
    columns += ("mixed_ms", "one_adapter_ms", "mixed_over_one_adapter_images_per_s")
    print(" ".join(f"{c:>12}" for c in columns))
    for r in out["results"]:
        print(" ".join(f"{r[c]:>12}" for c in columns))


if __name__ == "__main__":
    main()
