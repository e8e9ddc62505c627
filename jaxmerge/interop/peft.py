"""PEFT LoRA adapters of Hugging Face models, read into jaxmerge adapter trees
(`interop.peft_export` writes them).

    adapter, head, peft_config = load_peft_adapter("adapters/cifar10")            # a ViT's
    adapter, _, _ = load_peft_adapter("adapters/eurosat", names=clip.HF_NAMES)    # CLIP's

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted
linear layer, `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
jaxmerge stores `lora_a = A.T` (in, r), `lora_b = B.T` (r, out) and `scale`, PEFT's scaling:

    scale = alpha / r           (alpha / sqrt(r) with use_rslora)

where r and alpha are the config's `r` / `lora_alpha` unless a `rank_pattern` / `alpha_pattern`
key matches the module name. PEFT's matching rule, used here: the first key (in the file's
order) for which `re.match(rf"(.*\\.)?({key})$", module_name)` succeeds.

Module names are read by the model family's `NameMap` (`Family.names`; the ViT's by
default), the same table that writes them. A ViT's come in two spellings: transformers 4.x
(`encoder.layer.N.attention.attention.query`, `key`, `value`, `attention.output.dense`,
`intermediate.dense`, `output.dense`; also the Hub's checkpoint names) and transformers 5.x
(`layers.N.attention.q_proj`, `k_proj`, `v_proj`, `o_proj`, `mlp.fc1`, `mlp.fc2`), either under
`vit.` for ViTForImageClassification; CLIP's and SigLIP's are
`[vision_model.]encoder.layers.N.self_attn.q_proj`, ...
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmerge import lora
from jaxmerge.models import vit
from jaxmerge.models.names import NameMap

Tree = Any
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")
# Config values a plain LoRA adapter has; anything else changes the maths.
_PLAIN = {"use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False}


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup for one module name.

    The first key for which `(.*\\.)?(key)$` matches the whole name from its start wins;
    `default` when none does.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}  # fmt: skip


def _read_config_file(path: str) -> dict:
    """adapter_config.json as a dict; a ValueError naming the file for anything else."""
    expected = "expected a JSON object of LoRA settings"
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"PEFT adapter file {path!r}: empty; {expected}")
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"PEFT adapter file {path!r}: not UTF-8 text; {expected}") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"PEFT adapter file {path!r}: not valid JSON, truncated or corrupt ({error.msg} at "
            f"line {error.lineno} column {error.colno}); {expected}"
        ) from None
    if not isinstance(config, dict):
        found = _JSON_TYPES.get(type(config), type(config).__name__)
        raise ValueError(f"PEFT adapter file {path!r}: holds {found}; {expected}")
    return config


def _read_weights_file(path: str) -> dict[str, np.ndarray]:
    """adapter_model.safetensors as numpy arrays; a ValueError naming the file if unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if os.path.getsize(path) == 0:
        raise ValueError(f"PEFT adapter file {path!r}: empty; expected safetensors tensors")
    try:
        return load_file(path)
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"PEFT adapter file {path!r}: not a readable safetensors file, truncated or corrupt "
            f"({reason})"
        ) from None
    except TypeError as error:  # numpy has no bfloat16
        raise ValueError(
            f"PEFT adapter file {path!r}: a tensor dtype numpy cannot read ({error}); allowed: "
            f"float16, float32, float64"
        ) from None


def _read_adapter_files(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    config_path, weights_path = (os.path.join(folder, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
    if not os.path.isfile(config_path):
        raise ValueError(f"missing file: {config_path!r} does not exist")
    if not os.path.isfile(weights_path):
        raise ValueError(
            f"missing file: {weights_path!r} does not exist; only safetensors adapters are "
            f"supported (convert adapter_model.bin first)"
        )
    return _read_config_file(config_path), _read_weights_file(weights_path)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: Mapping, source: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type={config.get('peft_type')!r}; allowed: 'LORA'")
    for field, plain in _PLAIN.items():
        if config.get(field, plain) not in (plain, None):
            raise ValueError(f"{source}: {field}={config[field]!r}; allowed: {plain!r}")
    if not _is_positive_int(config.get("r")):
        raise ValueError(f"{source}: r={config.get('r')!r}; allowed: a positive integer")
    if not _is_finite_number(config.get("lora_alpha")):
        raise ValueError(
            f"{source}: lora_alpha={config.get('lora_alpha')!r}; allowed: a finite number"
        )
    for field, valid, allowed in (
        ("rank_pattern", _is_positive_int, "a positive integer"),
        ("alpha_pattern", _is_finite_number, "a finite number"),
    ):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{source}: {field}={patterns!r}; allowed: an object {{name: value}}")
        for key, value in patterns.items():
            if not valid(value):
                raise ValueError(f"{source}: {field}[{key!r}]={value!r}; allowed: {allowed}")
            try:
                re.compile(key)
            except re.error as error:
                raise ValueError(
                    f"{source}: {field} key {key!r} is not a regular expression ({error})"
                ) from None
    extra = set(config.get("modules_to_save") or ()) - {"classifier"}
    if extra:
        raise ValueError(
            f"{source}: modules_to_save={config['modules_to_save']!r}; allowed: ['classifier'] "
            f"(the task head); other saved modules would replace base weights"
        )


def _targets(target_modules, module: str) -> bool:
    """PEFT's target_modules rule: a string is a full-name regex; a list names the module or
    its last dotted parts."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def _check_named_modules_exist(config: Mapping, modules: list[str], source: str) -> None:
    """Every target_modules entry and rank/alpha_pattern key matches a module with factors: a
    name that matches none is a typo or belongs to other weights (PEFT would build the layer
    without these factors, or scale them as this config does not say)."""
    if not modules:
        return  # `load_peft_adapter` reports the file without factors
    ends = ", ".join(sorted({m.rpartition(".")[2] for m in modules}))
    where = f"in {WEIGHTS_FILE} (its modules end in {ends})"
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for target in targets:
            if not any(_targets([target], m) for m in modules):
                raise ValueError(
                    f"{source}: target_modules entry {target!r} matches no LoRA module {where}"
                )
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            if not any(pattern_value({key: True}, m, False) for m in modules):
                raise ValueError(f"{source}: {field} key {key!r} matches no LoRA module {where}")


def _check_modules_targeted(config: Mapping, modules: list[str], source: str) -> None:
    """Every module with factors is one target_modules names: PEFT drops the others."""
    targets = config.get("target_modules")
    if not isinstance(targets, (str, list, tuple)) or targets == "all-linear":
        return
    for module in modules:
        if not _targets(targets, module):
            raise ValueError(
                f"{source}: {WEIGHTS_FILE} holds LoRA factors for {module!r}, which "
                f"target_modules={targets!r} does not name; PEFT would not load them"
            )


def _check_finite(tensors: Mapping[str, np.ndarray], path: str) -> None:
    for name, value in tensors.items():
        finite = np.isfinite(value)
        if not finite.all():
            key = name.removeprefix(PREFIX)
            match = _LORA_KEY.fullmatch(key)
            module = match.group("module") if match else key.rpartition(".")[0]
            raise ValueError(
                f"PEFT adapter file {path!r}: module {module!r} has "
                f"{finite.size - int(finite.sum())} NaN or infinite values in tensor {name!r}"
            )


def load_peft_adapter(
    folder: str, *, names: NameMap = vit.HF_NAMES
) -> tuple[Tree, Tree | None, dict]:
    """Reads a PEFT LoRA adapter of the Hugging Face model whose module names `names` maps
    (`Family.names`; default the ViT's: a ViTModel or ViTForImageClassification).

    Returns:
      (adapter, head, peft_config): the jaxmerge adapter tree (float32 factors, per-target
      `scale` from r, lora_alpha, use_rslora, rank_pattern and alpha_pattern), the
      `modules_to_save` classifier as `heads.MlpHead(hidden=0, ...)` parameters
      `{"out": {"kernel": (D, classes), "bias": (classes,)}}` or None, and adapter_config.json.

    Raises:
      ValueError: in one line, a missing, empty, truncated or corrupt file, or a config that is
        not a JSON object (naming the path); a non-LoRA or DoRA config, a non-positive r or
        non-finite lora_alpha (naming the field); target_modules, rank_pattern or alpha_pattern
        naming modules without factors, or factors for a module target_modules does not name;
        NaN or infinite weights (naming the module); a tensor that is not a LoRA factor of
        one of the model's linear layers (`names.peft_targets`) or the classifier, or a factor
        whose rank disagrees with the config.
    """
    config, tensors = _read_adapter_files(folder)
    source = f"PEFT adapter {folder!r}"
    _check_config(config, source)
    _check_finite(tensors, os.path.join(folder, WEIGHTS_FILE))
    factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    head_tensors = {}
    for name, value in tensors.items():
        key = name.removeprefix(PREFIX)
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            leaf = key.replace(".modules_to_save", "").rpartition(".")
            if re.fullmatch(r"classifier(\.[^.]+)?", leaf[0]) and leaf[2] in ("weight", "bias"):
                head_tensors[leaf[2]] = value
                continue
            raise ValueError(
                f"{source}: tensor {name!r} is neither a LoRA factor nor the classifier"
            )
        factors[match.group("module")][match.group("factor")] = value
    _check_named_modules_exist(config, sorted(factors), source)
    adapter: dict = {}
    use_rslora = bool(config.get("use_rslora", False))
    for module, pair in sorted(factors.items()):
        path = names.ours(module)
        if path is None or not names.is_peft_target(path):
            raise ValueError(
                f"{source}: LoRA on module {module!r}; allowed: the model's linear layers "
                f"(jaxmerge paths {names.peft_targets!r})"
            )
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: module {module!r} has lora_{list(pair)} but not both")
        a, b = pair["A"], pair["B"]
        rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"{source}: tensor {PREFIX}{module}.lora_A/B.weight have shapes {a.shape} and "
                f"{b.shape}; the config's rank for this module is {rank}"
            )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        node = {
            "lora_a": jnp.asarray(a.T, jnp.float32),
            "lora_b": jnp.asarray(b.T, jnp.float32),
            "scale": jnp.asarray(scale, jnp.float32),
        }
        adapter = lora.set_at(adapter, path, node)
    if not adapter:
        raise ValueError(f"{source}: {WEIGHTS_FILE} holds no LoRA factors")
    _check_modules_targeted(config, sorted(factors), source)
    head = None
    if head_tensors:
        if "weight" not in head_tensors:
            raise ValueError(f"{source}: the saved classifier has a bias but no weight")
        weight = head_tensors["weight"]
        bias = head_tensors.get("bias", np.zeros(weight.shape[0], weight.dtype))
        head = {
            "out": {
                "kernel": jnp.asarray(weight.T, jnp.float32),
                "bias": jnp.asarray(bias, jnp.float32),
            }
        }
    return adapter, head, config
