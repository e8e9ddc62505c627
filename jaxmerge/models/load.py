"""Builds the model a config describes and loads its base parameters from any supported source.

Sources (`config.base.source`):
  random      fresh parameters from `config.seed` (tests; pretraining from scratch)
  checkpoint  a jaxmerge run folder trained with mode "full" (e.g. `configs/pretrain.py`);
              its metadata names the ViT it holds
  hf, bigvision, ...  a pretrained checkpoint, read by the family's own `load_pretrained`
              (`Family.sources` lists what it reads): a Hugging Face ViTModel folder or a
              big_vision .npz for "vit", a CLIP / SigLIP folder for "clip" and "siglip", a
              SigLIP .npz for "siglip"
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxmerge import checkpoint, config_lib, models

Tree = Any


def family_of(config: ml_collections.ConfigDict | None) -> models.Family:
    """The model family a config names (runs saved before families existed are ViTs)."""
    return models.get("vit" if config is None else config.model.get("family", "vit"))


def build(kwargs: dict, config: ml_collections.ConfigDict | None = None):
    """A model from architecture kwargs, with the run's compute dtype, LoRA dropout, how LoRA
    is computed and which kernels run."""
    family = family_of(config)
    extra = {}
    if config is not None:
        extra = dict(
            dtype=jnp.dtype(config.model.dtype),
            lora_dropout=config.lora.dropout,
            lora_compute=config.model.get("lora_compute", "branch"),
            kernels=config.model.get("kernels", "auto"),
        )
    keys = family.architecture_keys
    return family.module(**{k: kwargs[k] for k in keys if k in kwargs}, **extra)


def load_base(config: ml_collections.ConfigDict) -> tuple[Any, Tree, dict]:
    """(model, base params, architecture kwargs) for the config's base source."""
    source, path = config.base.source, os.path.expanduser(config.base.path)
    family = family_of(config)
    family.check_source(source)
    wants_folder = source in ("checkpoint", "hf")
    if source != "random" and not (os.path.isdir(path) if wants_folder else os.path.isfile(path)):
        kind = "a folder" if wants_folder else "an .npz file"
        found = (
            "a file" if os.path.isfile(path) else "a folder" if os.path.isdir(path) else "nothing"
        )
        raise ValueError(
            f"config.base.path: {path!r} (resolved from {os.getcwd()!r}) is {found}; "
            f"base.source={source!r} needs {kind}"
        )
    if source == "random":
        kwargs = config_lib.model_kwargs(config)
        params = family.init_params(build(kwargs, config), jax.random.key(config.seed + 10_000))
    elif source == "checkpoint":
        params, metadata = checkpoint.load(os.path.join(path, "checkpoints"))
        if "base" not in params:
            raise ValueError(
                f"config.base.path: {path!r} is a {metadata.get('mode')!r} run; a base comes "
                f"from a run with mode 'full' (e.g. configs/pretrain.py)"
            )
        params, kwargs = params["base"], metadata["model"]
    else:
        kwargs, params = family.load_pretrained(source, path, config.model)
    kwargs = {k: (v.item() if hasattr(v, "item") else v) for k, v in kwargs.items()}
    keys = family.architecture_keys
    return build(kwargs, config), params, {k: kwargs[k] for k in keys if k in kwargs}
