"""The tiny training run most tests build on: digits, a mu/4 ViT on 8-pixel images, 30 steps."""

from jaxmerge import config_lib


def tiny_config(data_dir, **overrides):
    """A base config for the tiny run; `overrides` set dotted fields (`"lora.rank": 4`)."""
    config = config_lib.base_config()
    config.task = "digits"
    config.data_dir = str(data_dir)
    config.model.variant = "mu/4"
    config.model.image_size = 8
    config.batch_size = 16
    config.eval_batch_size = 64
    config.steps = 30
    config.warmup_steps = 3
    config.log_every = 5
    config.checkpoint_every = 10
    config.head.hidden = 16
    config.crop_padding = 0  # 2-pixel shifts of an 8-pixel digit erase it
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config
