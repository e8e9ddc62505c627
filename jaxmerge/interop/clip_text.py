"""The text tower of a Hugging Face `CLIPModel` as a jaxmerge tree (`models.clip_text.TextTower`).

The conversion of the format, module names by `models.clip_text.HF_NAMES`;
`models.clip_text.load_hf` is the loader that also checks every tensor against the tower's
shapes, and returns the `logit_scale` and `visual_projection` that `jaxmerge.text_heads`
needs:

    kwargs, params, extras = clip_text.load_hf("clip-vit-base-patch32")
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from jaxmerge.interop import files
from jaxmerge.interop.clip import HF_ACTIVATIONS, Collected

_TEXT_PREFIX = "text_model."
# transformers' CLIPTextConfig defaults (and CLIPConfig's projection_dim), for fields a
# config.json omits.
_TEXT_DEFAULTS = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=512, num_hidden_layers=12,
    intermediate_size=2048, num_attention_heads=8, layer_norm_eps=1e-5, projection_dim=512,
    eos_token_id=49407,
)  # fmt: skip


def hf_text_kwargs(config: Mapping, *, source: str = "config.json") -> dict:
    """`clip_text.TextTower` kwargs of a Hugging Face `CLIPModel` config dict (its
    `text_config` and `projection_dim`; missing fields take `CLIPTextConfig`'s defaults)."""
    kind = config.get("model_type")
    if kind != "clip":
        raise ValueError(
            f"{source}: model_type={kind!r} has no text tower; allowed: clip (a CLIPModel)"
        )
    text = dict(config.get("text_config") or {})
    act = text.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: text hidden_act={act!r}; allowed: {sorted(HF_ACTIVATIONS)}")
    d = _TEXT_DEFAULTS
    return dict(
        vocab_size=text.get("vocab_size", d["vocab_size"]),
        max_length=text.get("max_position_embeddings", d["max_position_embeddings"]),
        width=text.get("hidden_size", d["hidden_size"]),
        depth=text.get("num_hidden_layers", d["num_hidden_layers"]),
        mlp_dim=text.get("intermediate_size", d["intermediate_size"]),
        num_heads=text.get("num_attention_heads", d["num_attention_heads"]),
        layer_norm_eps=float(text.get("layer_norm_eps", d["layer_norm_eps"])),
        activation=HF_ACTIVATIONS[act],
        projection_dim=config.get("projection_dim", d["projection_dim"]),
        eos_token_id=text.get("eos_token_id", d["eos_token_id"]),
    )


def hf_to_text_params(
    state: Mapping[str, np.ndarray], source: str, names
) -> tuple[dict, dict, dict[str, str]]:
    """(text tower params, {"logit_scale", "visual_projection"}, {path: tensor name}) of a
    CLIPModel state dict, module names by `names` (`models.clip_text.HF_NAMES`); vision tensors
    are skipped. `visual_projection` is (in, out)."""
    collected, extras = Collected(), {}
    put = collected.put
    for name, value in state.items():
        value = np.asarray(value)
        key = name.removeprefix(_TEXT_PREFIX)
        if name == "logit_scale":
            extras["logit_scale"] = np.float32(value.reshape(()))
        elif name == "visual_projection.weight":
            extras["visual_projection"] = value.T.astype(np.float32)
        elif name == "text_projection.weight":
            put("projection/kernel", value.T, name)
        elif not name.startswith(_TEXT_PREFIX) or key.endswith("position_ids"):
            continue  # the image tower, and the index buffer older transformers saved
        elif key == "embeddings.token_embedding.weight":
            put("token_embedding", value, name)
        elif key == "embeddings.position_embedding.weight":
            put("pos_embedding", value[None], name)
        else:
            module, _, leaf = key.rpartition(".")
            path = names.ours(module)
            if path is None or leaf not in ("weight", "bias"):
                raise ValueError(f"{source}: parameter {name!r} is not part of a CLIP text tower")
            collected.put_layer(path, leaf, value, name)
    return collected.params, extras, collected.names


def read_hf_clip_text(folder: str, names) -> tuple[dict, dict, dict, dict[str, str]]:
    """(tower kwargs, params, extras, {path: tensor name}) of a `CLIPModel` folder's text tower,
    as numpy; `models.clip_text.load_hf` checks it."""
    source = f"Hugging Face checkpoint {folder!r}"
    config = files.read_json(os.path.join(folder, "config.json"))
    kwargs = hf_text_kwargs(config, source=source)
    params, extras, paths = hf_to_text_params(files.read_safetensors(folder), source, names)
    return kwargs, params, extras, paths
