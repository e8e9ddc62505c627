"""Seconds per learned merge (`jaxmerge.learned.learn_merge`) on this machine.

    python benchmarks/learned_merge_speed.py [--steps 150] [--repeats 3] [--json]

Setup: the offline suite's shipped base (ViT width 128, depth 6, patch 7, 28 px), rank-8
adapters on query and value with random factors, heads of one hidden layer of 256 (one
classification, one regression, one landmark head), 256 images per task, output matching,
300 Adam steps of 16 images per task. For each granularity (task-wise, layer-wise, and "core",
jaxmerge's default) and 2 and 3 adapters it reports the first call (compile included) and the
median of `--repeats` further calls with a new key (the compiled program reused). One CPU
device, as the study and `python -m jaxmerge evaluate` run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--steps", type=int, default=300)
ARGS.add_argument("--repeats", type=int, default=3)
ARGS.add_argument("--json", action="store_true", help="print JSON lines only")


def main() -> None:
    args = ARGS.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.configs import offline
    from jaxmerge import heads, learned, lora, models, run_config
    from jaxmerge.models import load

    parts = run_config.of_saved(offline.get_config().train)
    model, base, _ = load.load_base(parts.model, parts.base)
    config = lora.LoraConfig(rank=8, targets=models.get(parts.model.family).target_regex("qv"))

    def adapter(seed):
        fresh = lora.init_adapter(jax.random.key(seed), base, config)
        keys = iter(jax.random.split(jax.random.key(seed + 50), 64))
        return jax.tree.map(
            lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape) if x.ndim == 2 else x,
            fresh,
        )

    specs = [
        ("classification", 10, {"target": "label"}),
        ("regression", 1, {"target": "value", "mean": 0.0, "std": 1.0}),
        ("landmarks", 4, {"target": "landmarks", "norm_points": (0, 1)}),
    ]
    task_heads = []
    for index, (kind, outputs, spec) in enumerate(specs):
        head_def = heads.MlpHead(256, outputs)
        params = head_def.init(jax.random.key(index), jnp.zeros((1, 128)))["params"]
        task_heads.append(learned.Head(head_def, params, kind, spec))
    images = [
        np.asarray(jax.random.normal(jax.random.key(10 + i), (256, 28, 28, 3))) for i in range(3)
    ]
    adapters = [adapter(i) for i in range(3)]
    rows = []
    for n in (2, 3):
        for granularity in ("task", "layer", "core"):
            times = []
            for repeat in range(args.repeats + 1):
                start = time.perf_counter()
                tree, _, history = learned.learn_merge(
                    model,
                    base,
                    adapters[:n],
                    task_heads[:n],
                    images[:n],
                    objective="output_match",
                    granularity=granularity,
                    steps=args.steps,
                    key=jax.random.key(repeat),
                )
                jax.block_until_ready(tree)
                times.append(time.perf_counter() - start)
            row = {
                "adapters": n,
                "granularity": granularity,
                "first_s": times[0],
                "steady_s": statistics.median(times[1:]),
                "steps": args.steps,
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row))
    if not args.json:
        print("| adapters | granularity | first call (s) | steady (s) |")
        print("|---|---|---|---|")
        for r in rows:
            cells = [r["adapters"], r["granularity"], f"{r['first_s']:.2f}", f"{r['steady_s']:.2f}"]
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
