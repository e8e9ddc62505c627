"""LoRA adapters trained with other JAX libraries, as jaxmerge adapter trees.

    adapter = from_qwix(params, alpha=16.0)  # a qwix (tunix) LoRA model's params
    adapter = from_lorax(params)             # params holding lorax LoraWeight leaves
    merged = jaxmerge.merging.merge([adapter, other], "ties", weights)

Each returns `{target path: {"lora_a": (in, r), "lora_b": (r, out), "scale": ()}}` (`lora.py`),
the update `dW = scale * lora_a @ lora_b` in the layout of a flax kernel (in, out).

qwix (Google's, PyPI `qwix`; read in `qwix/_src/providers/lora.py` of 0.1.8):
`qwix.LoraProvider(module_path=regex, rank=r, alpha=alpha)` adds, in the module of each adapted
weight `<w>` (a Dense's `kernel`), the parameters `<w>_lora_a` (in, r) and `<w>_lora_b` (r, out),
and computes `y = x @ kernel + (x @ lora_a @ lora_b) * alpha / rank`. Kernels with more axes
(DenseGeneral, Einsum) get `lora_a` (*contracted, r) and `lora_b` (r, *kept), flattened here to
(in, r) and (r, out): the order of a kernel reshaped to 2-D (as `interop.bigvision` does). The
rule's alpha is not among the params, so it is an argument; the rank is lora_a's last axis.

    lora_a = <w>_lora_a,  lora_b = <w>_lora_b,  scale = alpha / rank

lorax (davisyoshida's, PyPI `jax-lorax`; read in `lorax/transform.py` and `lorax/helpers.py` of
0.3.1): `lorax.init_lora` replaces each adapted kernel `w` (M, N) = (in, out) with
`LoraWeight(w, a, b, alpha)`, a (r, N) and b (M, r), materialised as `w + alpha / r * b @ a`.
Its names are the other way round from jaxmerge's:

    lora_a = b (in, r),  lora_b = a (r, out),  scale = alpha / r

Only 2-D kernels map (lorax's convolution factors do not).

Paths: a weight's path is its module path ('/'-joined), plus `/<w>` when the weight is not
called `kernel`. `PATH_MAP` turns the module names of jaxmerge's ViT, big_vision's ViT and
Hugging Face's Flax ViT into target paths; pass `path_map` ({regex: target template}, the first
regex that fully matches wins) for models named otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp

from jaxmerge import lora
from jaxmerge.models import vit

Tree = Any
# Paths may sit under a prefix (a classifier holding the ViT as `encoder/...`).
_ANY_PREFIX = r"(?:.*/)?"
_BLOCK_LINEARS = [p for p in vit.HF_NAMES.blocks if not p.startswith("norm")]
TARGET = re.compile(rf"block_\d+/({'|'.join(_BLOCK_LINEARS)})|pooler")
_TARGETS_TEXT = "block_N/attention/{query,key,value,out}, block_N/mlp/{fc1,fc2} or pooler"

PATH_MAP: dict[str, str] = {
    # jaxmerge's own names (a flax model built like `models.vit`).
    rf"{_ANY_PREFIX}(block_\d+/(?:{'|'.join(_BLOCK_LINEARS)})|pooler)": r"\1",
    # big_vision / vision_transformer.
    rf"{_ANY_PREFIX}Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_\d+/"
    r"(query|key|value|out)": r"block_\1/attention/\2",
    rf"{_ANY_PREFIX}Transformer/encoderblock_(\d+)/MlpBlock_\d+/Dense_0": r"block_\1/mlp/fc1",
    rf"{_ANY_PREFIX}Transformer/encoderblock_(\d+)/MlpBlock_\d+/Dense_1": r"block_\1/mlp/fc2",
    # Hugging Face's Flax ViT (transformers 4.x names, from the one table in `models.vit`).
    **{
        rf"{_ANY_PREFIX}encoder/layer/(\d+)/{names['v4'].replace('.', '/')}": rf"block_\1/{path}"
        for path, names in vit.HF_NAMES.blocks.items()
        if path in _BLOCK_LINEARS
    },
    rf"{_ANY_PREFIX}pooler/dense": "pooler",
}


def target_path(path: str, path_map: Mapping[str, str], source: str) -> str:
    """The jaxmerge target of another library's weight path: the template of the first
    `path_map` regex that fully matches it.

    Raises:
      ValueError: when no regex matches, or the result is not a LoRA target of the ViT.
    """
    for pattern, template in path_map.items():
        if (match := re.fullmatch(pattern, path)) is not None:
            target = match.expand(template)
            if TARGET.fullmatch(target) is None:
                raise ValueError(
                    f"{source} adapter: layer {path!r} maps to {target!r}, which is not a LoRA "
                    f"target; allowed: {_TARGETS_TEXT}"
                )
            return target
    raise ValueError(
        f"{source} adapter: layer {path!r} maps to no jaxmerge target; allowed: a path that "
        f"one of the {len(path_map)} path_map regexes fully matches (jaxmerge's, big_vision's "
        f"or Hugging Face Flax's ViT names); pass path_map={{regex: target}} for other names"
    )


def _unbox(value: Any) -> Any:
    """The array of a flax-boxed parameter (nn.Partitioned and the like), else the value."""
    return value.unbox() if hasattr(value, "unbox") else value


def _modules(tree: Any, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
    """(module path, node) for every mapping of a nested parameter tree, parents first."""
    if not isinstance(tree, Mapping):
        return
    yield prefix, tree
    for key, child in tree.items():
        yield from _modules(child, f"{prefix}/{key}" if prefix else str(key))


def _weight_path(module: str, name: str) -> str:
    """A weight's path for `path_map`: its module's path, plus its name unless `kernel`."""
    if name == "kernel":
        return module
    return f"{module}/{name}" if module else name


def _build(
    found: list[tuple[str, Any, Any, float]],
    path_map: Mapping[str, str] | None,
    source: str,
    base: Tree | None,
) -> Tree:
    """The adapter tree of [(weight path, lora_a, lora_b, scale)], flattened to 2-D factors."""
    path_map = PATH_MAP if path_map is None else path_map
    adapter: Tree = {}
    sources: dict[str, str] = {}
    for path, lora_a, lora_b, scale in found:
        target = target_path(path, path_map, source)
        if target in sources:
            raise ValueError(
                f"{source} adapter: layers {sources[target]!r} and {path!r} both map to "
                f"{target!r}; allowed: one layer per target (check path_map)"
            )
        sources[target] = path
        rank = lora_a.shape[-1]
        node = {
            "lora_a": jnp.asarray(lora_a).reshape(-1, rank),
            "lora_b": jnp.asarray(lora_b).reshape(rank, -1),
            "scale": jnp.asarray(scale, jnp.float32),
        }
        adapter = lora.set_at(adapter, target, node)
    if base is not None:
        lora.check_against_base(adapter, base, f"{source} adapter")
    return adapter


def _alpha_for(alpha: float | Mapping[str, float], module: str) -> float:
    """qwix's rule lookup: the first `module_path` regex that fully matches the module path."""
    if not isinstance(alpha, Mapping):
        return float(alpha)
    for pattern, value in alpha.items():
        if re.fullmatch(pattern, module):
            return float(value)
    raise ValueError(
        f"qwix adapter: layer {module!r}: no regex of alpha={dict(alpha)!r} fully matches it; "
        f"allowed: one alpha, or {{module_path regex: alpha}} as the LoraRules had"
    )


def from_qwix(
    params: Tree,
    *,
    alpha: float | Mapping[str, float],
    rank: int | None = None,
    path_map: Mapping[str, str] | None = None,
    base: Tree | None = None,
) -> Tree:
    """The jaxmerge adapter of a qwix LoRA model's params: `scale = alpha / rank`.

    Args:
      params: the model's parameter tree (flax linen `variables["params"]`, or an nnx State's
        `to_pure_dict()`), holding `<w>_lora_a` / `<w>_lora_b` beside each adapted weight.
      alpha: the LoraRule's alpha; or {module_path regex: alpha} for several rules (the first
        regex that fully matches the module path wins, as in qwix).
      rank: the rule's rank, checked against each lora_a when given.
      path_map: {regex: target template} from module paths to targets (`PATH_MAP` if None).
      base: when given, every target must be a dense layer of these jaxmerge base params with
        the update's shape.

    Returns:
      {target path: {"lora_a": (in, r), "lora_b": (r, out), "scale": ()}}.
    """
    found = []
    for module, node in _modules(params):
        for key in node:
            if not str(key).endswith("_lora_a"):
                continue
            name = str(key).removesuffix("_lora_a")
            path = _weight_path(module, name)
            if f"{name}_lora_b" not in node:
                raise ValueError(
                    f"qwix adapter: {module}/{key} has no {name}_lora_b beside it; allowed: "
                    f"both factors of each adapted weight"
                )
            lora_a, lora_b = _unbox(node[key]), _unbox(node[f"{name}_lora_b"])
            r = lora_a.shape[-1]
            if (rank is not None and r != rank) or lora_b.shape[0] != r:
                raise ValueError(
                    f"qwix adapter: layer {path!r}: {key} {tuple(lora_a.shape)} and "
                    f"{name}_lora_b {tuple(lora_b.shape)}; allowed: (..., r) and (r, ...) with "
                    f"r = rank {rank if rank is not None else r}"
                )
            scale = _alpha_for(alpha, module) / r
            found.append((path, lora_a, lora_b, scale))
    if not found:
        raise ValueError(
            "qwix adapter: no `<weight>_lora_a` / `<weight>_lora_b` parameters in params; "
            "allowed: the params of a model wrapped by qwix.apply_lora_to_model with a LoraProvider"
        )
    return _build(found, path_map, "qwix", base)


def _lorax_factors(value: Any) -> tuple[Any, Any, Any] | None:
    """(a, b, alpha or None) of a LoraWeight (by its fields) or of a {"a", "b"[, "w", "alpha"]}
    mapping (a LoraWeight saved as a dict), else None."""
    if isinstance(value, Mapping):
        if {"a", "b"} <= set(value) <= {"w", "a", "b", "alpha"}:
            return _unbox(value["a"]), _unbox(value["b"]), value.get("alpha")
        return None
    if all(hasattr(value, field) for field in ("w", "a", "b", "alpha")):
        return value.a, value.b, value.alpha
    return None


def from_lorax(
    params: Tree,
    *,
    alpha: float | None = None,
    path_map: Mapping[str, str] | None = None,
    base: Tree | None = None,
) -> Tree:
    """The jaxmerge adapter of params holding lorax `LoraWeight`s: `lora_a = b`, `lora_b = a`,
    `scale = alpha / r`.

    Args:
      params: the parameter tree `lorax.init_lora` returned (after training), or the same with
        each LoraWeight as a {"w", "a", "b", "alpha"} dict (`w` may be absent).
      alpha: for dicts without "alpha" (a LoraWeight carries its own).
      path_map, base: as in `from_qwix`.

    Returns:
      {target path: {"lora_a": (in, r), "lora_b": (r, out), "scale": ()}}.
    """
    found = []
    for module, node in _modules(params):
        for name, value in node.items():
            factors = _lorax_factors(value)
            if factors is None:
                continue
            path = _weight_path(module, str(name))
            a, b, weight_alpha = factors
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"lorax adapter: layer {path!r}: a {tuple(a.shape)}, b {tuple(b.shape)}; "
                    f"allowed: a dense kernel's factors, a (r, out) and b (in, r)"
                )
            weight_alpha = alpha if weight_alpha is None else weight_alpha
            if weight_alpha is None:
                raise ValueError(
                    f"lorax adapter: layer {path!r} has no alpha; allowed: an 'alpha' entry, "
                    f"or from_lorax(..., alpha=...)"
                )
            found.append((path, b, a, float(weight_alpha) / b.shape[-1]))
    if not found:
        raise ValueError(
            "lorax adapter: no LoraWeight in params; allowed: the params lorax.init_lora returns"
        )
    return _build(found, path_map, "lorax", base)
