"""The tiny training run most tests build on: digits, a mu/4 ViT on 8-pixel images, 30 steps;
and a command run in-process on it (a subprocess costs a JAX import each)."""

import os
import sys

import pytest
from absl import flags

from jaxmerge import cli, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--config.model.variant=mu/4", "--config.model.image_size=8"]


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


def run_command(module, argv, capsys, monkeypatch) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of `module.cli()` on `argv`, in this process; the flags it
    defines are removed again, so the next command can define its own."""
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: True)  # the test process's malloc
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    before = set(flags.FLAGS)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exited:
            module.cli()
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def train_argv(workdir, *extra, arg="task=digits"):
    return [
        "--config",
        f"{ROOT}/configs/adapter.py:{arg}",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        *extra,
    ]
