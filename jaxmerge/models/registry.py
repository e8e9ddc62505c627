"""The registry of model families: `Family`, `register` and `get`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its module, named variants and what LoRA targets look like in it.

    Attributes:
      name: registry key (`config.model.family`).
      module: the flax module; called as `module(**kwargs)` with kwargs from `variant`.
      variant: `variant(name, **overrides) -> kwargs` for a named size such as "B/16".
      architecture_keys: the kwargs a base checkpoint fixes (stored with every run).
      target_presets: {preset name: regex over target paths} for `LoraConfig.targets`.
      init_params: `init_params(model, key) -> params`, random base parameters.
      pixel_mean, pixel_std: the normalisation the family's checkpoints were pretrained with;
        images enter the model as `(x / 255 - mean) / std` per channel. The default, 0.5 and
        0.5, scales to [-1, 1] (HF ViT, big_vision, SigLIP).

    The module's adapted layers are `layers.LoraDense`; it has `width` (the pooled feature's
    size) and `image_size` attributes, takes `dtype`, `lora_dropout`, `lora_compute` and
    `kernels`, returns `{"pooled": (B, width), ...}`, and checks an adapter it is given with
    `lora.check_against_base` (as `vit.ViT` does).
    """

    name: str
    module: type[nn.Module]
    variant: Callable[..., dict[str, Any]]
    architecture_keys: tuple[str, ...]
    target_presets: Mapping[str, str]
    init_params: Callable[[nn.Module, Any], Any]
    pixel_mean: tuple[float, ...] = (0.5,)
    pixel_std: tuple[float, ...] = (0.5,)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    """The registered family `name`; a ValueError lists the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"config.model.family: got {name!r}; allowed: one of {sorted(FAMILIES)}")
    return FAMILIES[name]
