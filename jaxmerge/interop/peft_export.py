"""Writes jaxmerge adapters as PEFT LoRA folders (`interop.peft` reads them).

    save_peft_adapter("exported/merged", merged, naming="v5", base_model_name_or_path="...")
    save_peft_adapter("exported/clip", merged, names=models.get("clip").names)

Module names come from the model family's `NameMap`, the table that reads them back; see
`interop.peft` for the files and PEFT's scaling rule.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmerge import lora
from jaxmerge.interop.peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE
from jaxmerge.models import vit
from jaxmerge.models.names import NameMap

Tree = Any
NAMINGS = tuple(vit.HF_NAMES.namings)


def peft_module_name(path: str, naming: str, names: NameMap = vit.HF_NAMES) -> str:
    """The transformers module name of a jaxmerge target path by the family's `NameMap`, e.g.
    for a ViT 'block_2/attention/out' -> 'layers.2.attention.o_proj' (v5) or
    'encoder.layer.2.attention.output.dense' (v4); for CLIP 'block_2/attention/query' ->
    'encoder.layers.2.self_attn.q_proj' (both namings; the model's prefix comes on top)."""
    if not names.is_peft_target(path):
        raise ValueError(
            f"save_peft_adapter: target {path!r} has no PEFT LoRA equivalent; allowed: paths "
            f"matching {names.peft_targets!r}"
        )
    return names.theirs(path, naming)


def _most_common(values: list) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def lora_config_for(
    adapter: Tree,
    naming: str = "v5",
    *,
    base_model_name_or_path: str | None = None,
    with_classifier: bool = False,
    names: NameMap = vit.HF_NAMES,
) -> dict:
    """A PEFT adapter_config.json dict reproducing each target's rank and scale.

    r and lora_alpha are the most common rank and `alpha = scale * r` over the targets; the
    other targets get exact-name entries in rank_pattern / alpha_pattern, so PEFT's
    `scaling = alpha / r` equals jaxmerge's `scale` everywhere (use_rslora stays false).
    """
    items = lora.target_items(adapter)
    # Without the model's prefix: PEFT matches target_modules and the patterns on a module
    # name's last dotted parts, so they hold for the bare model and a classifier alike.
    modules = [peft_module_name(path, naming, names) for path, _ in items]
    ranks = [int(node["lora_a"].shape[-1]) for _, node in items]
    alphas = [
        float(np.asarray(node["scale"], np.float64)) * r for (_, node), r in zip(items, ranks)
    ]
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(n): k for n, k in zip(modules, ranks) if k != r},
        "alpha_pattern": {re.escape(n): _number(a) for n, a in zip(modules, alphas) if a != alpha},
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": ["classifier"] if with_classifier else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_peft_adapter(
    folder: str,
    adapter: Tree,
    *,
    naming: str = "v5",
    base_model_name_or_path: str | None = None,
    head: Tree | None = None,
    overwrite: bool = False,
    names: NameMap = vit.HF_NAMES,
) -> None:
    """Writes a factored jaxmerge adapter (merged ones included) as a PEFT LoRA folder.

    `PeftModel.from_pretrained(model, folder)` then computes what the family's module with
    `adapter` computes: per target `lora_A = lora_a.T`, `lora_B = lora_b.T`, and rank/alpha patterns
    that give each target its own scale (see `lora_config_for`). Factors are written as
    float32.

    Args:
      folder: the output folder; created if needed.
      adapter: a tree of `{lora_a, lora_b, scale}` nodes at block linear layers or the pooler.
      naming: "v5" (transformers 5.x module names) or "v4" (transformers 4.x).
      names: the model family's `NameMap` (`Family.names`; default the ViT's): module names
        and their prefix in the Hugging Face model (CLIPVisionModel's `vision_model.` in
        transformers 4.x, "v4").
      base_model_name_or_path: recorded in the config for `AutoPeftModel` loaders.
      head: a linear task head `{"out": {"kernel": (D, classes), "bias"}}` to save as the
        `modules_to_save` classifier of the family's image classification model
        (ViTForImageClassification: module names get `vit.`; `names.classifier_prefix`).
      overwrite: allow writing into a non-empty folder.

    Raises:
      ValueError: for an unknown naming, a delta tree (factor it first), a target PEFT cannot
        adapt, a head that is not linear, or a non-empty folder without overwrite=True.
    """
    if naming not in names.namings:
        raise ValueError(f"save_peft_adapter: naming={naming!r}; allowed: {names.namings}")
    items = lora.target_items(adapter)
    if not items:
        raise ValueError("save_peft_adapter: the adapter has no target nodes")
    for path, node in items:
        if "lora_a" not in node:
            raise ValueError(
                f"save_peft_adapter: target {path!r} is a dense delta, not LoRA factors; factor "
                f"the delta tree first (e.g. a merge with output='factored', which takes a "
                f"truncated SVD) to export it"
            )
    if head is not None and set(head) != {"out"}:
        raise ValueError(
            f"save_peft_adapter: head has layers {sorted(head)}; allowed: a linear head "
            f"{{'out': {{'kernel', 'bias'}}}} (HF's classifier is one linear layer)"
        )
    if head is not None and names.classifier_prefix is None:
        raise ValueError(
            "save_peft_adapter: this model family has no Hugging Face classification model "
            "reading the feature jaxmerge's heads read; allowed: head=None"
        )
    lacking = [path for path, _ in items if head is not None and path in names.without_classifier]
    if lacking:
        raise ValueError(
            f"save_peft_adapter: the Hugging Face classification model has no {lacking[0]} "
            f"to adapt; allowed: head=None, or an adapter without {lacking[0]!r}"
        )
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise ValueError(
            f"save_peft_adapter: folder {folder!r} exists and is not empty; pass overwrite=True "
            f"to write into it"
        )
    from safetensors.numpy import save_file

    config = lora_config_for(
        adapter,
        naming,
        base_model_name_or_path=base_model_name_or_path,
        with_classifier=head is not None,
        names=names,
    )
    prefix = PREFIX + (names.prefix_for(naming) if head is None else names.classifier_prefix)
    tensors = {}
    for path, node in items:
        module = prefix + peft_module_name(path, naming, names)
        tensors[f"{module}.lora_A.weight"] = _float32(node["lora_a"]).T
        tensors[f"{module}.lora_B.weight"] = _float32(node["lora_b"]).T
    if head is not None:
        tensors[f"{PREFIX}classifier.weight"] = _float32(head["out"]["kernel"]).T
        tensors[f"{PREFIX}classifier.bias"] = _float32(head["out"]["bias"])
    os.makedirs(folder, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _float32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))
