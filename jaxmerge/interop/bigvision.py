"""big_vision / vision_transformer `.npz` checkpoints as jaxmerge trees: ViTs and SigLIP towers.

The conversion of the format; the families' loaders (`models.vit.load_bigvision`,
`models.clip.load_siglip_npz`) check every tensor against the shapes their module expects:

    vit_kwargs, params, head = vit.load_bigvision("augreg_B16.npz", image_size=384)
    kwargs, params, _ = clip.load_siglip_npz("webli_en_b16_224.npz")

`head` is as in `interop.hf`. Position embeddings are bilinearly resampled to `image_size`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxmerge.interop import files

Tree = Any


def _dense(flat: Mapping[str, np.ndarray], prefix: str, reshape: Callable | None = None) -> dict:
    kernel, bias = flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"]
    if reshape is not None:
        kernel, bias = reshape(kernel, bias)
    return {"kernel": kernel, "bias": bias}


def _attention(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    """Per-head (D, H, hd) query/key/value and (H, hd, D) out kernels as 2-D (in, out)."""
    qkv = lambda k, b: (k.reshape(k.shape[0], -1), b.reshape(-1))  # noqa: E731
    out = lambda k, b: (k.reshape(-1, k.shape[-1]), b)  # noqa: E731
    node = {name: _dense(flat, f"{prefix}/{name}", qkv) for name in ("query", "key", "value")}
    node["out"] = _dense(flat, f"{prefix}/out", out)
    return node


def _norm(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    return {"scale": flat[f"{prefix}/scale"], "bias": flat[f"{prefix}/bias"]}


def _unstack_scanned(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned layout (`encoderblock/...` with a leading depth axis) as blocks."""
    scanned = [k for k in flat if k.startswith("Transformer/encoderblock/")]
    for key in scanned:
        value = flat.pop(key)
        rest = key.removeprefix("Transformer/encoderblock/")
        for i in range(value.shape[0]):
            flat[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return flat


def _submodule(names: set[str], pattern: str, block: str, index: int = 0) -> str:
    """The index-th (by number) submodule of a block matching pattern, e.g. LayerNorm_2."""
    found = sorted(
        (n for n in names if re.fullmatch(pattern, n)), key=lambda n: int(n.split("_")[-1])
    )
    if len(found) <= index:
        raise ValueError(f"big_vision checkpoint: block {block!r} has no {pattern!r} module")
    return f"{block}/{found[index]}"


def bigvision_to_params(flat: Mapping[str, np.ndarray]) -> tuple[dict, Tree, Tree | None]:
    """(vit_kwargs without image_size, params, head) from a flat '/'-joined big_vision dict.

    Accepts the vision_transformer augreg names (`MultiHeadDotProductAttention_1`,
    `LayerNorm_0/2`, `MlpBlock_3`) and big_vision's own (`..._0`, `LayerNorm_0/1`), unscanned
    or scanned.

    Raises:
      ValueError: naming a missing parameter, or for an unsupported (MAP-head) checkpoint.
    """
    try:
        return _bigvision_to_params(flat)
    except KeyError as error:
        raise ValueError(f"big_vision checkpoint: missing parameter {error.args[0]!r}") from None


def _bigvision_to_params(flat: Mapping[str, np.ndarray]) -> tuple[dict, Tree, Tree | None]:
    flat = _unstack_scanned({k.removeprefix("params/"): np.asarray(v) for k, v in flat.items()})
    if any(k.startswith("MAPHead") for k in flat):
        raise ValueError(
            "big_vision checkpoint: MAP-head pooling is not supported; allowed: cls, gap"
        )
    blocks = sorted(
        {m.group(0) for k in flat if (m := re.match(r"Transformer/encoderblock_\d+", k))},
        key=lambda b: int(b.rsplit("_", 1)[1]),
    )
    required = ("embedding/kernel", "Transformer/encoder_norm/scale")
    missing = [k for k in required if k not in flat] + ([] if blocks else ["encoderblock_0"])
    if missing:
        raise ValueError(
            f"big_vision checkpoint: missing parameter {missing[0]!r}; is this a ViT checkpoint "
            f"with augreg or big_vision names?"
        )
    embedding = flat["embedding/kernel"]
    patch, _, channels, width = embedding.shape
    params: dict = {
        "patch_embed": {"kernel": embedding.reshape(-1, width), "bias": flat["embedding/bias"]},
        "encoder_norm": _norm(flat, "Transformer/encoder_norm"),
    }
    has_cls = "cls" in flat
    if has_cls:
        params["cls"] = flat["cls"]
    pos_key = next(
        (k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if k in flat),
        None,
    )
    if pos_key is None:
        raise ValueError("big_vision checkpoint: missing parameter 'Transformer/posembed_input'")
    params["pos_embedding"] = flat[pos_key]
    num_heads = None
    for i, block in enumerate(blocks):
        names = {k[len(block) + 1 :].split("/")[0] for k in flat if k.startswith(block + "/")}
        attention = _submodule(names, r"MultiHeadDotProductAttention_\d+", block)
        mlp = _submodule(names, r"MlpBlock_\d+", block)
        num_heads = num_heads or flat[f"{attention}/query/kernel"].shape[1]
        params[f"block_{i}"] = {
            "norm1": _norm(flat, _submodule(names, r"LayerNorm_\d+", block, 0)),
            "attention": _attention(flat, attention),
            "norm2": _norm(flat, _submodule(names, r"LayerNorm_\d+", block, 1)),
            "mlp": {"fc1": _dense(flat, f"{mlp}/Dense_0"), "fc2": _dense(flat, f"{mlp}/Dense_1")},
        }
    if "pre_logits/kernel" in flat:
        params["pooler"] = _dense(flat, "pre_logits")
    head = {"out": _dense(flat, "head")} if "head/kernel" in flat else None
    fc1 = params["block_0"]["mlp"]["fc1"]["kernel"]
    vit_kwargs = dict(
        width=width,
        depth=len(blocks),
        mlp_dim=fc1.shape[1],
        num_heads=num_heads,
        patch_size=patch,
        channels=channels,
        pool="cls" if has_cls else "mean",
        pooler="pooler" in params,
        layer_norm_eps=1e-6,
        gelu_approximate=True,
    )
    return vit_kwargs, params, head


def _fit_image_size(
    params: dict, patch: int, has_cls: bool, image_size: int | None, source: str, caller: str
) -> int:
    """The image size to run at (`image_size`, or the trained one for None), with
    `params["pos_embedding"]` resampled in place to its patch grid."""
    grid = params["pos_embedding"].shape[1] - int(has_cls)
    side = int(round(grid**0.5))
    if side * side != grid:
        raise ValueError(
            f"{source}: parameter 'pos_embedding' has {grid} patch positions, not a square grid"
        )
    size = image_size or side * patch
    if size % patch:
        raise ValueError(
            f"{caller}: image_size={image_size!r}; allowed: a multiple of the patch size {patch}"
        )
    new_grid = (size // patch) ** 2
    if new_grid != grid:
        pos = np.asarray(params["pos_embedding"], np.float32)
        params["pos_embedding"] = np.asarray(files.resample_pos_embedding(pos, new_grid, has_cls))
    return size


def read_bigvision_npz(
    path: str, *, image_size: int | None = None
) -> tuple[dict, Tree, Tree | None]:
    """(vit_kwargs, params, head) of a big_vision / vision_transformer ViT `.npz` (augreg
    naming), tanh GELU, eps 1e-6, as numpy; `models.vit.load_bigvision` checks the shapes.

    Args:
      path: the .npz file, keys '/'-joined parameter paths.
      image_size: the input size to run at; the position embeddings are bilinearly resampled
        from the checkpoint's grid. None keeps the trained size.

    Returns:
      (vit_kwargs, params, head) as in `interop.hf`; `pooler` is the `pre_logits` layer and
      `head` the checkpoint's `head` (None if it has none).
    """
    flat = files.read_npz(path, keep=lambda k: not k.startswith("opt/"))
    vit_kwargs, params, head = bigvision_to_params(flat)
    vit_kwargs["image_size"] = _fit_image_size(
        params,
        vit_kwargs["patch_size"],
        vit_kwargs["pool"] == "cls",
        image_size,
        f"big_vision checkpoint {path!r}",
        "load_bigvision_npz",
    )
    return vit_kwargs, params, head


# ----------------------------------------------------------------------------- SigLIP


def _siglip_tower(flat: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(kwargs without image_size, params) of an unscanned, prefix-free big_vision SigLIP image
    tower (`models.clip.VisionTower` with pool="map")."""
    blocks = sorted(
        {int(m.group(1)) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    )
    embedding = flat["embedding/kernel"]
    patch, _, channels, width = embedding.shape
    params: dict = {
        "patch_embed": {"kernel": embedding.reshape(-1, width), "bias": flat["embedding/bias"]},
        "pos_embedding": flat["pos_embedding"].reshape(1, -1, width),
        "encoder_norm": _norm(flat, "Transformer/encoder_norm"),
    }
    for i in blocks:
        block = f"Transformer/encoderblock_{i}"
        params[f"block_{i}"] = {
            "norm1": _norm(flat, f"{block}/LayerNorm_0"),
            "attention": _attention(flat, f"{block}/MultiHeadDotProductAttention_0"),
            "norm2": _norm(flat, f"{block}/LayerNorm_1"),
            "mlp": {"fc1": _dense(flat, f"{block}/MlpBlock_0/Dense_0"),
                    "fc2": _dense(flat, f"{block}/MlpBlock_0/Dense_1")},
        }  # fmt: skip
    head = "MAPHead_0"
    params["map_head"] = {
        "probe": flat[f"{head}/probe"],
        "attention": _attention(flat, f"{head}/MultiHeadDotProductAttention_0"),
        "norm": _norm(flat, f"{head}/LayerNorm_0"),
        "mlp": {"fc1": _dense(flat, f"{head}/MlpBlock_0/Dense_0"),
                "fc2": _dense(flat, f"{head}/MlpBlock_0/Dense_1")},
    }  # fmt: skip
    if "head/kernel" in flat:  # an image-side projection (absent in the released SigLIPs)
        params["projection"] = _dense(flat, "head")
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    kwargs = dict(
        width=width,
        depth=len(blocks),
        mlp_dim=params["block_0"]["mlp"]["fc1"]["kernel"].shape[1],
        num_heads=flat[query].shape[1],
        patch_size=patch,
        channels=channels,
        layer_norm_eps=1e-6,
        activation="gelu_tanh",
        pre_norm=False,
        pool="map",
        projection_dim=params["projection"]["kernel"].shape[1] if "projection" in params else 0,
    )
    return kwargs, params


def _siglip_key(key: str) -> str | None:
    """The tower-relative key of a SigLIP `.npz` key, or None for the text tower, the
    optimizer state and the `t`, `b` temperature and bias."""
    short = key.removeprefix("params/")
    if short.startswith(("txt/", "opt/")) or short in ("t", "b"):
        return None
    return short.removeprefix("img/")


def read_siglip_npz(path: str, *, image_size: int | None = None) -> tuple[dict, Tree]:
    """(tower kwargs, params) of the image tower of a big_vision SigLIP `.npz` (MAP head, tanh
    GELU, eps 1e-6), as numpy; `models.clip.load_siglip_npz` checks the shapes.

    Keys may carry `params/` and `img/` prefixes (two-tower checkpoints: the `txt/` tower and
    the `t`, `b` temperature and bias are skipped); scanned (`encoderblock/` with a leading
    depth axis) or not. `image_size` as in `read_bigvision_npz`.

    Raises:
      ValueError: a missing file or tensor (naming it), a checkpoint without a MAP head, or a
        bad image_size.
    """
    source = f"big_vision checkpoint {path!r}"
    raw = files.read_npz(path, keep=lambda k: _siglip_key(k) is not None)
    flat = _unstack_scanned({_siglip_key(k): v for k, v in raw.items()})
    if "MAPHead_0/probe" not in flat:
        raise ValueError(f"{source}: no MAPHead_0/probe; allowed: SigLIP towers (MAP head)")
    try:
        kwargs, params = _siglip_tower(flat)
    except KeyError as error:
        raise ValueError(f"{source}: missing parameter {error.args[0]!r}") from None
    kwargs["image_size"] = _fit_image_size(
        params, kwargs["patch_size"], False, image_size, source, "load_siglip_npz"
    )
    return kwargs, params
