"""Builds the model a run's model part describes and loads its base parameters from any
supported source.

Sources (`config.base.source`):
  random      fresh parameters from `config.seed` + 10000 (tests; pretraining from scratch)
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

from jaxmerge import checkpoint, models

Tree = Any


def build(kwargs: dict, model=None):
    """A model of `model`'s family (`run_config.ModelSettings`; None: a ViT, as runs saved
    before families) from architecture kwargs, with the run's compute dtype, LoRA dropout, how
    LoRA is computed and which kernels run."""
    family = models.get("vit" if model is None else model.family)
    extra = {}
    if model is not None:
        extra = dict(
            dtype=jnp.dtype(model.dtype),
            lora_dropout=model.lora_dropout,
            lora_compute=model.lora_compute,
            kernels=model.kernels,
        )
    keys = family.architecture_keys
    return family.module(**{k: kwargs[k] for k in keys if k in kwargs}, **extra)


def load_base(model, base) -> tuple[Any, Tree, dict]:
    """(model, base params, architecture kwargs) for `run_config.RunParts`' `model` and
    `base` parts: `model` names the family and its variant, `base` the source."""
    source, path = base.source, os.path.expanduser(base.path)
    family = models.get(model.family)
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
        kwargs = model.kwargs
        params = family.init_params(build(kwargs, model), jax.random.key(base.seed))
    elif source == "checkpoint":
        params, metadata = checkpoint.load(os.path.join(path, "checkpoints"))
        if "base" not in params:
            raise ValueError(
                f"config.base.path: {path!r} is a {metadata.get('mode')!r} run; a base comes "
                f"from a run with mode 'full' (e.g. configs/pretrain.py)"
            )
        params, kwargs = params["base"], metadata["model"]
    else:
        kwargs, params = family.load_pretrained(source, path, model)
    kwargs = {k: (v.item() if hasattr(v, "item") else v) for k, v in kwargs.items()}
    keys = family.architecture_keys
    return build(kwargs, model), params, {k: kwargs[k] for k in keys if k in kwargs}
