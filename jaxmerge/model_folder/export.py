"""Exports of a model folder: the merged adapter as a PEFT LoRA folder, the backbone as a
Hugging Face model folder."""

from __future__ import annotations

import os
from typing import Any

from jaxmerge import lora, models
from jaxmerge.model_folder import staging
from jaxmerge.model_folder.folder import load
from jaxmerge.model_folder.model import MultiTaskModel

Tree = Any


def check_peft_exportable(merged: Tree | None, folded: bool, method: str | None) -> None:
    """Raises ValueError unless the merged adapter can be written as a PEFT LoRA folder."""
    if folded or merged is None:
        raise ValueError(
            "--export_peft: the model is saved folded (--fold), so it holds no separate merged "
            "adapter; merge again without --fold to export one"
        )
    dense = [path for path, node in lora.target_items(merged) if "lora_a" not in node]
    if dense:
        raise ValueError(
            f"--export_peft: method {method!r} returned dense deltas (e.g. at {dense[0]!r}), "
            f"which PEFT LoRA cannot hold; allowed: a factored result (a PEFT method, or "
            f"--merge_param output=factored for the delta-space methods)"
        )


def check_not_fused(model: MultiTaskModel, flag: str) -> None:
    """Raises ValueError for a fused model (`fused`): its adapters stay apart under gates, so
    there is no one merged adapter or backbone to export."""
    if model.lora is not None:
        raise ValueError(
            f"{flag}: the model is fused (its adapters stay apart under gates); allowed: a "
            f"merged model folder (python -m jaxmerge merge --method ...)"
        )


def write_peft(model: MultiTaskModel, directory: str, naming: str = "v5") -> None:
    """Writes a model's merged adapter as a PEFT LoRA folder into the existing empty
    `directory` (`interop.peft_export`), module names by the family's own `NameMap`
    (`Family.names`: CLIPVisionModel's for CLIP, ViTModel's for a ViT)."""
    from jaxmerge.interop import peft_export

    check_not_fused(model, "--export_peft")
    check_peft_exportable(model.merged, model.info["folded"], model.info["merge"]["method"])
    family = models.get(model.info["model"]["family"])
    if family.names is None:
        raise ValueError(f"--export_peft: family {family.name!r} has no Hugging Face names")
    base = model.info.get("base", {})
    name = base.get("path") if base.get("source") == "hf" else None  # a Hub / HF folder name
    peft_export.save_peft_adapter(
        directory, model.merged, naming=naming, base_model_name_or_path=name, names=family.names
    )


def export_peft(model: MultiTaskModel | str, directory: str, naming: str = "v5") -> str:
    """`write_peft` into a new folder `directory`, written whole or not at all
    (`staging.stage`); `model` is a loaded model or a model folder. Returns the folder."""
    model = load(model) if isinstance(model, str) else model
    check_not_fused(model, "--export_peft")
    check_peft_exportable(model.merged, model.info["folded"], model.info["merge"]["method"])
    with staging.stage([("--export_peft", directory)]) as partials:
        write_peft(model, partials["--export_peft"], naming)
    return staging.resolve(directory)


def check_hf_exportable(model_def, family: str) -> None:
    """Raises ValueError unless `family` writes the backbone as a Hugging Face model."""
    if models.get(family).save_hf is None:
        with_export = sorted(n for n, f in models.FAMILIES.items() if f.save_hf)
        raise ValueError(f"--export_hf: family {family!r} has no export; allowed: {with_export}")
    if getattr(model_def, "pool", "cls") != "cls":
        raise ValueError(
            f"--export_hf: the backbone pools by {model_def.pool!r}; allowed: pool='cls', the "
            f"class token a ViTModel reads"
        )


def write_hf(model: MultiTaskModel, directory: str, naming: str = "v4") -> None:
    """Writes a model's backbone (merged adapter folded in) by the family's `save_hf` (the
    ViT's writes a `ViTModel` folder) into the existing empty `directory`."""
    check_not_fused(model, "--export_hf")
    family = models.get(model.info["model"]["family"])
    check_hf_exportable(model.model_def, family.name)
    family.save_hf(directory, model.info["model"]["kwargs"], model.backbone, naming)
    _modes_by_umask(directory)


def _modes_by_umask(directory: str) -> None:
    """Gives the files under `directory` the umask's mode (0o666 & ~umask), as `open` does:
    safetensors writes its files 0600, unreadable by the group a model is shared with."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def export_hf(model: MultiTaskModel | str, directory: str, naming: str = "v4") -> str:
    """`write_hf` into a new folder `directory`, written whole or not at all
    (`staging.stage`); `model` is a loaded model or a model folder. Returns the folder."""
    model = load(model) if isinstance(model, str) else model
    check_not_fused(model, "--export_hf")
    check_hf_exportable(model.model_def, model.info["model"]["family"])
    with staging.stage([("--export_hf", directory)]) as partials:
        write_hf(model, partials["--export_hf"], naming)
    return staging.resolve(directory)
