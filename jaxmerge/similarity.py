"""How alike two LoRA adapters are: pure functions on adapter trees over the same targets.

Two measures, each averaged over the targets (the adapted dense layers) the adapters share:

* `delta_cosine`: the cosine of the two updates as vectors, `<dW_a, dW_b>_F / (|dW_a| |dW_b|)`,
  in [-1, 1]; 1 when one update is a positive multiple of the other.
* `subspace_overlap`: how much the spaces the updates act in coincide,
  `|U_a^T U_b|_F^2 / min(r_a, r_b)` with U the orthonormal top-r singular vectors of dW on the
  input side (or the output side), in [0, 1]; 1 when one space contains the other, 0 when
  they are orthogonal. Signs and scales do not matter.

    cosine = similarity.delta_cosine(adapter_a, adapter_b)
    matrix = similarity.pairwise({"digits": a, "textures": b}, similarity.delta_cosine)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from jaxmerge import lora

SIDES = ("input", "output")


def _shared_deltas(adapter_a, adapter_b) -> list[tuple[str, jnp.ndarray, jnp.ndarray, int, int]]:
    """[(path, dW_a, dW_b, r_a, r_b)] over the targets of both adapters, in float32."""
    nodes_a, nodes_b = dict(lora.target_items(adapter_a)), dict(lora.target_items(adapter_b))
    shared = sorted(nodes_a.keys() & nodes_b.keys())
    if not shared:
        raise ValueError(
            f"similarity: the adapters share no target; first has {sorted(nodes_a)[:3]}, "
            f"second {sorted(nodes_b)[:3]}"
        )
    out = []
    for path in shared:
        a, b = nodes_a[path], nodes_b[path]
        delta_a = lora.delta_of(a).astype(jnp.float32)
        delta_b = lora.delta_of(b).astype(jnp.float32)
        if delta_a.shape != delta_b.shape:
            raise ValueError(
                f"similarity: target {path!r} has update shapes {delta_a.shape} and {delta_b.shape}"
            )
        rank_a = a["lora_a"].shape[-1] if "lora_a" in a else min(delta_a.shape)
        rank_b = b["lora_a"].shape[-1] if "lora_a" in b else min(delta_b.shape)
        out.append((path, delta_a, delta_b, rank_a, rank_b))
    return out


def cosine(x: jnp.ndarray, y: jnp.ndarray) -> float:
    """`<x, y> / (|x| |y|)` over all entries; 0.0 when either is zero."""
    x, y = np.ravel(np.asarray(x, np.float64)), np.ravel(np.asarray(y, np.float64))
    norms = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / norms) if norms > 0 else 0.0


def top_singular_vectors(delta: jnp.ndarray, rank: int, side: str = "input") -> np.ndarray:
    """Orthonormal (in, k) or (out, k) top singular vectors of an (in, out) update, k <= rank.

    Directions with singular value below `1e-6 * s_max` are dropped (an update of rank < r).
    """
    if side not in SIDES:
        raise ValueError(f"side: got {side!r}; allowed: {SIDES}")
    delta = np.asarray(delta, np.float64)
    if rank + 8 < min(delta.shape):
        # A LoRA update has rank <= r: its SVD is that of its projection on a range basis of
        # r + 8 random directions (exact for rank <= r + 8), far cheaper than the full SVD of a
        # ViT-B layer.
        sketch = delta @ np.random.default_rng(0).standard_normal((delta.shape[1], rank + 8))
        basis = np.linalg.qr(sketch)[0]
        u, s, vh = np.linalg.svd(basis.T @ delta, full_matrices=False)
        u = basis @ u
    else:
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0] if side == "input" else vh.T[:, :0]
    keep = int(min(rank, np.sum(s > 1e-6 * s[0])))
    return u[:, :keep] if side == "input" else vh[:keep].T


def overlap(basis_a: np.ndarray, basis_b: np.ndarray) -> float:
    """`|A^T B|_F^2 / min(k_a, k_b)` for orthonormal column bases; 0.0 if either is empty."""
    k = min(basis_a.shape[1], basis_b.shape[1])
    if k == 0:
        return 0.0
    return float(np.sum(np.square(basis_a.T @ basis_b)) / k)


def delta_cosine(adapter_a, adapter_b) -> float:
    """Mean over shared targets of the cosine between the updates dW_a and dW_b."""
    pairs = _shared_deltas(adapter_a, adapter_b)
    return float(np.mean([cosine(da, db) for _, da, db, _, _ in pairs]))


def subspace_overlap(adapter_a, adapter_b, side: str = "input") -> float:
    """Mean over shared targets of the overlap of the updates' top-r singular subspaces.

    Args:
      side: "input" (the directions of the layer input an update reads, left singular vectors
        in the (in, out) layout) or "output" (the directions it writes).
    """
    values = []
    for _, delta_a, delta_b, rank_a, rank_b in _shared_deltas(adapter_a, adapter_b):
        values.append(
            overlap(
                top_singular_vectors(delta_a, rank_a, side),
                top_singular_vectors(delta_b, rank_b, side),
            )
        )
    return float(np.mean(values))


MEASURES: dict[str, Callable[..., float]] = {
    "delta_cosine": delta_cosine,
    "overlap_input": lambda a, b: subspace_overlap(a, b, "input"),
    "overlap_output": lambda a, b: subspace_overlap(a, b, "output"),
}


def pairwise(adapters: Mapping[str, object], measure: Callable[..., float]) -> dict:
    """{(name_a, name_b): measure(a, b)} for every unordered pair, names in the given order."""
    names = list(adapters)
    return {(a, b): measure(adapters[a], adapters[b]) for a, b in itertools.combinations(names, 2)}


def rank_correlation(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties get their mean rank)."""
    return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def pearson(x, y) -> float:
    """Pearson's r; nan when either input is constant or has fewer than 2 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # average the ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
