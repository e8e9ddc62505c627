"""Builds the model a config describes and loads its base parameters from any supported source.

Sources (`config.base.source`):
  random      fresh parameters from `config.seed` (tests; pretraining from scratch)
  checkpoint  a jaxmerge run folder trained with mode "full" (e.g. `configs/pretrain.py`);
              its metadata names the ViT it holds
  hf          a Hugging Face ViTModel / ViTForImageClassification folder (family "vit"), or a
              CLIP / SigLIP folder (families "clip", "siglip": `interop.clip`)
  bigvision   a big_vision / vision_transformer .npz (position embeddings resampled to
              `config.model.image_size`); a SigLIP .npz with its MAP head for "siglip"
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
    elif source == "hf" and family.name in ("clip", "siglip"):
        from jaxmerge.interop import clip

        kwargs, params = clip.load_hf_clip(path)[:2]
    elif source == "hf":
        from jaxmerge.interop import hf

        kwargs, params = hf.load_hf_vit(path)[:2]
        if kwargs["pooler"] and not config.model.pooler:
            # Heads read the class token, as ViTForImageClassification's classifier does; a
            # ViTModel checkpoint's pooler (dense + tanh) is left out unless asked for.
            params = {k: v for k, v in params.items() if k != "pooler"}
            kwargs = {**kwargs, "pooler": False}
        elif config.model.pooler and not kwargs["pooler"]:
            raise ValueError(
                f"config.model.pooler: True, but the checkpoint {path!r} has no pooler; "
                "allowed: False"
            )
    elif family.name == "siglip":
        from jaxmerge.interop import clip

        kwargs, params = clip.load_siglip_npz(path, image_size=config.model.image_size)[:2]
    else:
        from jaxmerge.interop import bigvision

        kwargs, params = bigvision.load_bigvision_npz(path, image_size=config.model.image_size)[:2]
    kwargs = {k: (v.item() if hasattr(v, "item") else v) for k, v in kwargs.items()}
    keys = family.architecture_keys
    return build(kwargs, config), params, {k: kwargs[k] for k in keys if k in kwargs}
