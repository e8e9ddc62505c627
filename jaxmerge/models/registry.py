"""The registry of model families: `Family`, `register` and `get`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxmerge.models.names import NameMap


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its module, named variants, what LoRA targets look like in it, its
    loader of pretrained weights and its names in Hugging Face / PEFT.

    Attributes:
      name: registry key (`config.model.family`).
      module: the flax module; called as `module(**kwargs)` with kwargs from `variant`.
      variant: `variant(name, **overrides) -> kwargs` for a named size such as "B/16".
      architecture_keys: the kwargs a base checkpoint fixes (stored with every run).
      config_fields: the fields of `config.model` that `variant` takes (besides the variant's
        name and `overrides`): the family's own, so no family filters out another's knobs.
      target_presets: {preset name: regex over target paths} for `LoraConfig.targets`.
      init_params: `init_params(model, key) -> params`, random base parameters.
      pixel_mean, pixel_std: the normalisation the family's checkpoints were pretrained with;
        images enter the model as `(x / 255 - mean) / std` per channel. The default, 0.5 and
        0.5, scales to [-1, 1] (HF ViT, big_vision, SigLIP).
      names: the two-way `NameMap` of jaxmerge paths and transformers module names, which
        reads checkpoints and PEFT adapters and writes them (`export_peft`); None: none.
      sources: the `config.base.source` values besides "random" and "checkpoint" that
        `load_pretrained` reads, e.g. ("hf", "bigvision").
      load_pretrained: `load_pretrained(source, path, model) -> (kwargs, params)` the base
        parameters of a pretrained checkpoint (numpy or jax arrays) for `model`, a
        `run_config.ModelSettings` (its image_size, a ViT's pooler).
      save_hf: `save_hf(folder, kwargs, params, naming)` writes a backbone as a Hugging Face
        model folder (`export_hf`); None where the family has no such export.
      images_in_compute_dtype: the module casts the images to its compute dtype before
        anything else reads them (a patch embedding), so bfloat16 images give the same result.

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
    names: NameMap | None = None
    sources: tuple[str, ...] = ()
    load_pretrained: Callable[[str, str, Any], tuple[dict, Any]] | None = None
    save_hf: Callable[..., str] | None = None
    images_in_compute_dtype: bool = False
    config_fields: tuple[str, ...] = ("image_size", "layer_norm_eps")

    def target_regex(self, targets: str) -> str:
        """The regex `LoraConfig.targets` takes for `targets`: a preset of this family (e.g.
        "qv") or a regex, returned as it is."""
        return self.target_presets.get(targets, targets)

    def check_source(self, source: str) -> None:
        """Raises ValueError unless the family loads a base from `config.base.source`."""
        allowed = ("random", "checkpoint", *self.sources)
        if source not in allowed:
            raise ValueError(
                f"config.base.source: got {source!r} for model family {self.name!r}; allowed: "
                f"{allowed}"
            )


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
