"""Builds the ViT a config describes and loads its base parameters from any supported source.

Sources (`config.base.source`):
  random      fresh parameters from `config.seed` (tests; pretraining from scratch)
  checkpoint  a jaxmerge run folder trained with mode "full" (e.g. `configs/pretrain.py`);
              its metadata names the ViT it holds
  hf          a Hugging Face ViTModel / ViTForImageClassification folder
  bigvision   a big_vision / vision_transformer .npz (position embeddings resampled to
              `config.model.image_size`)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxmerge import checkpoint, config_lib, vit

Tree = Any
# ViT attributes a base checkpoint fixes; the rest (dtype, dropout) are the run's choice.
ARCHITECTURE_KEYS = (
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "patch_size",
    "image_size",
    "channels",
    "pool",
    "pooler",
    "layer_norm_eps",
    "gelu_approximate",
)


def build(kwargs: dict, config: ml_collections.ConfigDict | None = None) -> vit.ViT:
    """A ViT from architecture kwargs, with the run's compute dtype and LoRA dropout."""
    extra = {}
    if config is not None:
        extra = dict(
            dtype=jnp.dtype(config.model.dtype),
            lora_dropout=config.lora.dropout,
            lora_impl=config.model.get("lora_impl", "factored"),
        )
    return vit.ViT(**{k: kwargs[k] for k in ARCHITECTURE_KEYS if k in kwargs}, **extra)


def load_base(config: ml_collections.ConfigDict) -> tuple[vit.ViT, Tree, dict]:
    """(model, base params, architecture kwargs) for the config's base source."""
    source, path = config.base.source, os.path.expanduser(config.base.path)
    if source == "random":
        kwargs = config_lib.vit_kwargs(config)
        params = vit.init_params(build(kwargs), jax.random.key(config.seed + 10_000))
    elif source == "checkpoint":
        params, metadata = checkpoint.load(os.path.join(path, "checkpoints"))
        if "base" not in params:
            raise ValueError(
                f"config.base.path: {path!r} is a {metadata.get('mode')!r} run; a base comes "
                f"from a run with mode 'full' (e.g. configs/pretrain.py)"
            )
        params, kwargs = params["base"], metadata["model"]
    elif source == "hf":
        from jaxmerge import pretrained

        kwargs, params = pretrained.load_hf_vit(path)[:2]
    else:
        from jaxmerge import pretrained

        kwargs, params = pretrained.load_bigvision_npz(path, image_size=config.model.image_size)[:2]
    kwargs = {k: (v.item() if hasattr(v, "item") else v) for k, v in kwargs.items()}
    return build(kwargs, config), params, {k: kwargs[k] for k in ARCHITECTURE_KEYS if k in kwargs}
