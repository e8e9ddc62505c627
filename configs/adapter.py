r"""Train one LoRA adapter (mode=lora) or a head-finetuning baseline (mode=head) for a task.

    python -m jaxmerge.train --config configs/adapter.py:task=digits --workdir /tmp/jm
    python -m jaxmerge.train --config configs/adapter.py:task=digits,mode=head --workdir /tmp/jm

Arguments (after the colon, comma-separated key=value): task (any name in
`jaxmerge.tasks.TASKS`), mode (lora | head | full), base (a jaxmerge run folder holding a base,
e.g. /tmp/jm/full/fashion_mnist from configs/pretrain.py; empty = random init, for smoke runs).
Any field can also be set by flag: --config.lora.rank=16 --config.steps=500.

Expected: on the default random base, digits reaches about 0.8-0.9 test accuracy in 300
steps (batch 128, about 2-3 min on 2 CPU cores); on the pretrained base of configs/pretrain.py
it is higher (see experiments/README.md).
"""

from jaxmerge import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg)
    config = config_lib.base_config()
    config.task = args.pop("task", config.task)
    config.mode = args.pop("mode", config.mode)
    base = args.pop("base", "")
    if base:
        config.base.source, config.base.path = "checkpoint", base
    if args:
        raise ValueError(
            f"configs/adapter.py: unknown arguments {sorted(args)}; known: task, mode, base"
        )
    config.model.variant = "Ti/4"
    config.model.overrides.depth = 4
    config.model.overrides.width = 128
    config.model.overrides.mlp_dim = 512
    config.model.overrides.num_heads = 4
    config.model.image_size = 32
    return config
