"""Merging LoRA adapters: a registry of methods, each a pure jitted function on adapter trees.

    merged = merge([adapter_1, adapter_2], "ties", [0.7, 0.3], density=0.5)
    params = lora.fold_into_base(base, merged)

Two families share the registry `METHODS`:

* PEFT's `add_weighted_adapter` (PEFT 0.21 names, parameters and numerics): `cat`, `linear`,
  `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and the SVD variants `svd`, `ties_svd`,
  `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`. The result is an adapter whose
  `scale` is 1.0 (PEFT gives the new adapter `lora_alpha = r`). As in PEFT, a single adapter is
  always merged with `linear`.
* Delta-space methods from the merging literature, on `dW_i = scale_i a_i @ b_i`:
  `task_arithmetic`, `ties_delta`, `dare_delta`, `breadcrumbs`, `knots`. Their `output` is
  "delta" (a delta tree of `{"delta": dW}` nodes) or "factored" (an adapter of rank `rank`,
  by default the largest input rank, `scale` 1.0, from a truncated SVD).

Inputs are factored adapters (`{"lora_a", "lora_b", "scale"}` nodes) over the same targets and
base shapes. Maths runs in float32; factors and deltas come back in the inputs' dtype. SVD
results carry their singular values in `lora_b` and a fixed sign convention
(`factorize.canonical_signs`), so they are reproducible; PEFT keeps LAPACK's arbitrary signs,
which only matters with `svd_clamp` (the clamp quantile is taken over signed entries).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from jaxmerge import factorize as fz
from jaxmerge import lora
from jaxmerge import merge_utils as mu

Tree = Any
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered method: `fn(adapters, weights, key, **params) -> tree` and its needs."""

    name: str
    fn: Callable[..., Tree]
    params: dict[str, Any]  # keyword name -> default (inspect.Parameter.empty if required)
    equal_ranks: bool
    needs_key: bool
    peft: bool
    jitted: Callable[..., Tree]


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, equal_ranks: bool = False, needs_key: bool = False, peft: bool = False):
    """Registers `fn(adapters, weights, key, *, **params)` under `name`, jitted with every
    keyword-only parameter static (they set shapes and branches); weights and key are traced."""

    def decorate(fn):
        signature = inspect.signature(fn).parameters.values()
        params = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
        jitted = jax.jit(fn, static_argnames=tuple(params))
        METHODS[name] = MergeMethod(name, fn, params, equal_ranks, needs_key, peft, jitted)
        return fn

    return decorate


def merge(
    adapters: Sequence[Tree],
    method: str,
    weights: Sequence[float] | jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    **params: Any,
) -> Tree:
    """Merges adapters with a registered method after validating every input.

    Args:
      adapters: factored adapter trees over the same targets and base shapes.
      method: a name in `METHODS`.
      weights: one weight per adapter (default all 1.0); may be a traced array.
      key: a `jax.random` key, required by the DARE methods.
      **params: the method's keyword parameters (see its docstring).

    Returns:
      A new adapter tree, or a delta tree for delta-space methods with output="delta".

    Raises:
      ValueError: naming the field, the bad value and what is allowed.
    """
    spec, weights, params = validate(adapters, method, weights, key, params)
    if spec.peft and len(adapters) == 1:
        spec, params = METHODS["linear"], {}  # PEFT's rule: one adapter is merged linearly
    return spec.jitted(list(adapters), weights, key, **params)


# ----------------------------------------------------------------------------- validation


def _check_choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field}: got {value!r}; allowed: one of {list(allowed)}")


def _check_rank(field, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{field}: got {value!r}; allowed: None or an integer >= 1")


def _check_density(field, value):
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{field}: got {value!r}; allowed: a number in (0, 1]")


def _check_fraction(field, value):
    if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
        raise ValueError(f"{field}: got {value!r}; allowed: None or a number in [0, 1]")


def _check_number(field, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{field}: got {value!r}; allowed: a real number")


_PARAM_CHECKS = {
    "density": _check_density,
    "majority_sign_method": lambda f, v: _check_choice(f, v, ("total", "frequency")),
    "svd_rank": _check_rank,
    "svd_clamp": _check_fraction,
    "rank": _check_rank,
    "output": lambda f, v: _check_choice(f, v, ("delta", "factored")),
    "combine": lambda f, v: _check_choice(f, v, ("ties", "task_arithmetic")),
    "gamma": _check_fraction,
    "scale": _check_number,
}


def _check_adapters(adapters, equal_ranks: bool, method: str) -> None:
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters: got {adapters!r:.60}; allowed: a non-empty list of adapters")
    layouts = []
    for index, adapter in enumerate(adapters):
        items = lora.target_items(adapter)
        if not items:
            raise ValueError(f"adapters[{index}]: has no LoRA target nodes")
        layout = {}
        for path, node in items:
            if not all(name in node for name in lora.FACTORS):
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has keys {sorted(node)}; allowed: "
                    f"factored nodes with keys {list(lora.FACTORS)}"
                )
            a, b = node["lora_a"], node["lora_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has lora_a {a.shape} and lora_b "
                    f"{b.shape}; allowed: shapes (in, r) and (r, out)"
                )
            layout[path] = (a.shape[0], b.shape[1], a.shape[1])
        layouts.append(layout)
    first = layouts[0]
    for index, layout in enumerate(layouts[1:], 1):
        if layout.keys() != first.keys():
            missing, extra = sorted(first.keys() - layout), sorted(layout.keys() - first)
            raise ValueError(
                f"adapters[{index}]: targets differ from adapters[0]'s (missing {missing}, extra "
                f"{extra}); allowed: adapters of the same layers"
            )
        for path, (fan_in, fan_out, rank) in layout.items():
            if (fan_in, fan_out) != first[path][:2]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has base shape {(fan_in, fan_out)}, "
                    f"adapters[0] has {first[path][:2]}; allowed: the same base shapes"
                )
            if equal_ranks and rank != first[path][2]:
                raise ValueError(
                    f"adapters[{index}]: target {path!r} has rank {rank}, adapters[0] has "
                    f"{first[path][2]}; method {method!r} needs equal ranks (use 'cat' or an "
                    f"'*svd' method for unequal ranks)"
                )


def validate(adapters, method, weights, key, params):
    """Checks a `merge` call; returns (method spec, float32 weights, params with defaults)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: one of {sorted(METHODS)}")
    spec = METHODS[method]
    _check_adapters(adapters, spec.equal_ranks, method)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(
            f"params: method {method!r} got unknown parameter(s) {unknown}; allowed: "
            f"{sorted(spec.params)}"
        )
    full = {**spec.params, **params}
    for name, value in full.items():
        if value is inspect.Parameter.empty:
            raise ValueError(f"{name}: method {method!r} needs {name}=...; none was given")
        if name in _PARAM_CHECKS:
            _PARAM_CHECKS[name](name, value)
    if "gamma" in full and full["gamma"] + full["density"] > 1.0:
        raise ValueError(
            f"gamma: got gamma={full['gamma']} with density={full['density']}; allowed: "
            f"gamma + density <= 1"
        )
    if spec.needs_key and key is None:
        raise ValueError(f"key: method {method!r} draws random masks; pass key=jax.random.key(0)")
    n = len(adapters)
    weights = jnp.ones((n,), F32) if weights is None else jnp.asarray(weights, F32)
    if weights.shape != (n,):
        raise ValueError(
            f"weights: got shape {weights.shape}; allowed: one weight per adapter, shape ({n},)"
        )
    return spec, weights, full


# ----------------------------------------------------------------------------- tree plumbing


def _targets(adapters, key=None, draws=None):
    """`(paths, nodes, noises)`: each target's path, its node in every adapter, and its noise.

    With a key, `noise` is that target's slice of one flat U[0, 1) draw holding `draws(nodes)`
    numbers per target (one threefry call: its compile time grows with the number of calls);
    without, `noise` is None.
    """
    items = [lora.target_items(adapter) for adapter in adapters]
    paths = [path for path, _ in items[0]]
    nodes = [[it[index][1] for it in items] for index in range(len(paths))]
    noises = [None] * len(paths)
    if key is not None:
        counts = [draws(target_nodes) for target_nodes in nodes]
        uniform = jax.random.uniform(key, (sum(counts),))
        starts = [sum(counts[:index]) for index in range(len(counts))]
        noises = [uniform[start : start + count] for start, count in zip(starts, counts)]
    return paths, nodes, noises


def _tree(paths, nodes) -> Tree:
    out: Tree = {}
    for path, node in zip(paths, nodes):
        out = lora.set_at(out, path, node)
    return out


def _map_nodes(fn, adapters, key=None, draws=None):
    """Applies `fn(nodes, noise)` to each target across adapters (noise as in `_targets`)."""
    paths, nodes, noises = _targets(adapters, key, draws)
    return _tree(paths, [fn(target_nodes, noise) for target_nodes, noise in zip(nodes, noises)])


def _factor_draws(nodes):
    return sum(n["lora_a"].size + n["lora_b"].size for n in nodes)


def _dense_draws(nodes):
    return len(nodes) * nodes[0]["lora_a"].shape[0] * nodes[0]["lora_b"].shape[1]


def _max_rank(adapters) -> int:
    return max(max(lora.ranks(adapter).values()) for adapter in adapters)


def _adapter_node(a, b, dtype):
    return {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype), "scale": jnp.asarray(1.0, F32)}


def _stack(nodes, name):
    return jnp.stack([node[name].astype(F32) for node in nodes])


def _scales(nodes):
    return jnp.stack([jnp.asarray(node["scale"], F32) for node in nodes])


def _deltas(nodes):
    """(n, in, out) float32 stack of `dW_i = scale_i a_i @ b_i`."""
    return jnp.stack(
        [
            n["scale"].astype(F32) * mu.matmul(n["lora_a"].astype(F32), n["lora_b"].astype(F32))
            for n in nodes
        ]
    )


def _stacked_a(nodes):
    """`[a_1, ..., a_n]` (in, sum r_i): its span holds the column space of every dW_i, so it is
    where a truncated SVD of a combination of pruned dW_i starts looking."""
    return jnp.concatenate([node["lora_a"].astype(F32) for node in nodes], 1)


def _weighted_factors(nodes, weights):
    """`a_cat = [w_1 s_1 a_1, ..., w_n s_n a_n]` (in, R) and `b_cat = [b_1; ...; b_n]` (R, out),
    so that `a_cat @ b_cat = sum_i w_i dW_i`."""
    coefficients = weights * _scales(nodes)
    a = jnp.concatenate([c * n["lora_a"].astype(F32) for c, n in zip(coefficients, nodes)], 1)
    b = jnp.concatenate([n["lora_b"].astype(F32) for n in nodes], 0)
    return a, b


# ----------------------------------------------------------------------------- PEFT family


@register("cat", peft=True)
def cat(adapters, weights, key):
    """PEFT `cat`: `a = [w_1 s_1 a_1, ..., w_n s_n a_n]`, `b = [b_1; ...; b_n]`, rank sum r_i.

    Exact: `a @ b = sum_i w_i dW_i`.
    """
    del key

    def node(nodes, _):
        return _adapter_node(*_weighted_factors(nodes, weights), nodes[0]["lora_a"].dtype)

    return _map_nodes(node, adapters)


def _factor_space(adapters, weights, key, combine):
    """PEFT's factor-space merge: with `c_i = w_i s_i`, A and B are combined separately as
    `a = combine(a_i, sign(c_i) sqrt|c_i|)` and `b = combine(b_i, sqrt|c_i|)`."""

    def node(nodes, noise):
        coefficients = weights * _scales(nodes)
        root = jnp.sqrt(jnp.abs(coefficients))
        a, b = _stack(nodes, "lora_a"), _stack(nodes, "lora_b")
        noise_a, noise_b = (None, None) if noise is None else (noise[: a.size], noise[a.size :])
        a = combine(a, jnp.where(coefficients >= 0, root, -root), noise_a)
        b = combine(b, root, noise_b)
        return _adapter_node(a, b, nodes[0]["lora_a"].dtype)

    return _map_nodes(node, adapters, key, _factor_draws)


def _combiner(kind: str, density: float = 1.0, majority_sign_method: str = "total"):
    """`combine(tensors, weights, key)` of PEFT's merge_utils for one method kind."""

    def combine(tensors, weights, noise):
        if kind == "linear":
            return mu.weighted_sum(tensors, weights)
        if kind == "magnitude_prune":
            return mu.weighted_sum(mu.magnitude_prune(tensors, density), weights)
        if kind == "ties":
            return mu.ties_combine(
                mu.magnitude_prune(tensors, density), weights, majority_sign_method
            )
        if kind == "dare_linear":
            return mu.weighted_sum(mu.random_prune(noise, tensors, density), weights)
        pruned = mu.random_prune(noise, tensors, density)  # dare_ties
        return mu.ties_combine(pruned, weights, majority_sign_method)

    return combine


@register("linear", equal_ranks=True, peft=True)
def linear(adapters, weights, key):
    """PEFT `linear`: `a = sum_i sign(c_i) sqrt|c_i| a_i`, `b = sum_i sqrt|c_i| b_i`, c_i = w_i s_i.

    Not the weighted sum of dW_i (cross terms a_i b_j appear) unless there is one adapter.
    """
    return _factor_space(adapters, weights, key, _combiner("linear"))


@register("ties", equal_ranks=True, peft=True)
def ties(adapters, weights, key, *, density, majority_sign_method="total"):
    """PEFT `ties` on A and B separately: trim to the top-`density` magnitudes, elect signs,
    disjoint mean of the weighted factors (weights as in `linear`)."""
    return _factor_space(adapters, weights, key, _combiner("ties", density, majority_sign_method))


@register("dare_linear", equal_ranks=True, needs_key=True, peft=True)
def dare_linear(adapters, weights, key, *, density):
    """PEFT `dare_linear` on A and B: drop entries with probability 1 - density, rescale the rest
    by 1/density, weighted sum (weights as in `linear`)."""
    return _factor_space(adapters, weights, key, _combiner("dare_linear", density))


@register("dare_ties", equal_ranks=True, needs_key=True, peft=True)
def dare_ties(adapters, weights, key, *, density, majority_sign_method="total"):
    """PEFT `dare_ties` on A and B: DARE drop-and-rescale, then TIES sign election and mean."""
    return _factor_space(
        adapters, weights, key, _combiner("dare_ties", density, majority_sign_method)
    )


@register("magnitude_prune", equal_ranks=True, peft=True)
def magnitude_prune(adapters, weights, key, *, density):
    """PEFT `magnitude_prune` on A and B: keep the top-`density` magnitudes, weighted sum."""
    return _factor_space(adapters, weights, key, _combiner("magnitude_prune", density))


def _svd_family(adapters, weights, key, combine, svd_rank, svd_clamp):
    """PEFT's `*_svd` methods: `dW = combine(dW_i, w_i)` densely, then its rank-r truncated SVD
    `u_r (s_r vh_r)` becomes `(lora_a, lora_b)`, optionally clamped (see `fz.clamp_factors`).

    PEFT takes a full LAPACK SVD of each dW and keeps r triplets; `fz.top_svds` finds those r
    by subspace iteration from the span of the input `lora_a`s, to a tested residual.
    """
    rank = svd_rank or _max_rank(adapters)
    paths, nodes, noises = _targets(adapters, key, _dense_draws)
    deltas = [combine(_deltas(n), weights, noise) for n, noise in zip(nodes, noises)]
    triplets = fz.top_svds(deltas, [_stacked_a(n) for n in nodes], rank)
    return _tree(
        paths,
        [
            _factored_node(triplet, rank, svd_clamp, n[0]["lora_a"].dtype)
            for n, triplet in zip(nodes, triplets)
        ],
    )


def _factored_node(triplet, rank, svd_clamp, dtype):
    """An adapter node from an SVD `(u, s, vh)`: rank-r factors, optionally clamped."""
    a, b = fz.truncate(*triplet, rank)
    if svd_clamp is not None:
        a, b = fz.clamp_factors(a, b, svd_clamp)
    return _adapter_node(a, b, dtype)


@register("svd", peft=True)
def svd(adapters, weights, key, *, svd_rank=None, svd_clamp=None):
    """PEFT `svd`: the rank-r truncated SVD of `sum_i w_i dW_i`, r = svd_rank or the largest
    input rank, singular values in lora_b, optionally clamped to the `svd_clamp` quantile.

    Computed exactly from the stacked factors (`fz.thin_svds`, all targets in one batched
    computation), never forming a d x d matrix.
    """
    del key
    rank = svd_rank or _max_rank(adapters)
    paths, nodes, _ = _targets(adapters)
    svds = fz.thin_svds([_weighted_factors(n, weights) for n in nodes], rank)
    return _tree(
        paths,
        [
            _factored_node(triplet, rank, svd_clamp, n[0]["lora_a"].dtype)
            for n, triplet in zip(nodes, svds)
        ],
    )


@register("ties_svd", peft=True)
def ties_svd(
    adapters, weights, key, *, density, majority_sign_method="total", svd_rank=None, svd_clamp=None
):
    """PEFT `ties_svd`: TIES on the dense dW_i, then truncated SVD as in `svd`."""
    combine = _combiner("ties", density, majority_sign_method)
    return _svd_family(adapters, weights, key, combine, svd_rank, svd_clamp)


@register("dare_linear_svd", needs_key=True, peft=True)
def dare_linear_svd(adapters, weights, key, *, density, svd_rank=None, svd_clamp=None):
    """PEFT `dare_linear_svd`: DARE on the dense dW_i, weighted sum, truncated SVD."""
    combine = _combiner("dare_linear", density)
    return _svd_family(adapters, weights, key, combine, svd_rank, svd_clamp)


@register("dare_ties_svd", needs_key=True, peft=True)
def dare_ties_svd(
    adapters, weights, key, *, density, majority_sign_method="total", svd_rank=None, svd_clamp=None
):
    """PEFT `dare_ties_svd`: DARE then TIES on the dense dW_i, truncated SVD."""
    combine = _combiner("dare_ties", density, majority_sign_method)
    return _svd_family(adapters, weights, key, combine, svd_rank, svd_clamp)


@register("magnitude_prune_svd", peft=True)
def magnitude_prune_svd(adapters, weights, key, *, density, svd_rank=None, svd_clamp=None):
    """PEFT `magnitude_prune_svd`: magnitude pruning of the dense dW_i, weighted sum, SVD."""
    combine = _combiner("magnitude_prune", density)
    return _svd_family(adapters, weights, key, combine, svd_rank, svd_clamp)


# ----------------------------------------------------------------------------- delta space


def _delta_method(adapters, merged_node, output, rank, key=None, draws=None):
    """Runs `merged_node(nodes, noise) -> ("dense", dW) | ("lowrank", a, b)` on every target
    and returns the `output` kind: `{"delta": dW}` nodes, or rank-r factors of a truncated SVD
    (exact and thin for low-rank results, `fz.top_svds` from the inputs' span for dense ones).
    """
    rank = rank or _max_rank(adapters)
    paths, nodes, noises = _targets(adapters, key, draws)
    parts = [merged_node(n, noise) for n, noise in zip(nodes, noises)]
    dtypes = [n[0]["lora_a"].dtype for n in nodes]
    if output == "delta":
        deltas = [p[1] if p[0] == "dense" else mu.matmul(p[1], p[2]) for p in parts]
        return _tree(paths, [{"delta": d.astype(t)} for d, t in zip(deltas, dtypes)])
    dense = [i for i, p in enumerate(parts) if p[0] == "dense"]
    lowrank = [i for i, p in enumerate(parts) if p[0] == "lowrank"]
    triplets = {}
    if dense:
        matrices = [parts[i][1] for i in dense]
        triplets.update(
            zip(dense, fz.top_svds(matrices, [_stacked_a(nodes[i]) for i in dense], rank))
        )
    if lowrank:
        triplets.update(zip(lowrank, fz.thin_svds([parts[i][1:] for i in lowrank], rank)))
    return _tree(paths, [_factored_node(triplets[i], rank, None, t) for i, t in enumerate(dtypes)])


@register("task_arithmetic")
def task_arithmetic(adapters, weights, key, *, scale=1.0, output="delta", rank=None):
    """Task arithmetic (Ilharco et al. 2023): `dW = scale * sum_i w_i dW_i`.

    Formed from the stacked factors, so the factored output is an exact thin SVD.
    """
    del key

    def node(nodes, _):
        a, b = _weighted_factors(nodes, weights)
        return ("lowrank", scale * a, b)

    return _delta_method(adapters, node, output, rank)


@register("ties_delta")
def ties_delta(
    adapters,
    weights,
    key,
    *,
    density=0.2,
    majority_sign_method="total",
    scale=1.0,
    output="delta",
    rank=None,
):
    """TIES-merging (Yadav et al. 2023) on dW: trim, elect sign, disjoint mean.

    `t_i = w_i trim_density(dW_i)`, `g = sign(sum_i t_i)` ("total") or the sign vote
    ("frequency"), `dW = scale * sum_i t_i [sign t_i = g] / max(1, #{i: sign t_i = g})`.
    """
    del key

    def node(nodes, _):
        trimmed = mu.magnitude_prune(_deltas(nodes), density)
        weighted = trimmed * weights[:, None, None]
        mask = mu.majority_sign_mask(weighted, majority_sign_method)
        return ("dense", scale * mu.disjoint_mean(weighted, mask))

    return _delta_method(adapters, node, output, rank)


@register("dare_delta", needs_key=True)
def dare_delta(adapters, weights, key, *, density=0.1, scale=1.0, output="delta", rank=None):
    """DARE (Yu et al. 2023) on dW: `dW = scale * sum_i w_i m_i dW_i / density`, with
    `m_i ~ Bernoulli(density)` per entry, so that E[dW] is the task-arithmetic sum."""

    def node(nodes, noise):
        pruned = mu.random_prune(noise, _deltas(nodes), density)
        return ("dense", scale * mu.weighted_sum(pruned, weights))

    return _delta_method(adapters, node, output, rank, key, _dense_draws)


@register("breadcrumbs")
def breadcrumbs(
    adapters, weights, key, *, density=0.1, gamma=0.01, scale=1.0, output="delta", rank=None
):
    """Model Breadcrumbs (Davari & Belilovsky 2023): per task and layer, drop the `gamma`
    fraction of largest |dW_i| (outliers) and all but the next `density` fraction (noise), then
    `dW = scale * sum_i w_i mask_i dW_i`."""
    del key

    def node(nodes, _):
        deltas = _deltas(nodes)
        masked = jnp.stack([d * mu.magnitude_band_mask(d, density, gamma) for d in deltas])
        return ("dense", scale * mu.weighted_sum(masked, weights))

    return _delta_method(adapters, node, output, rank)


@register("knots")
def knots(
    adapters,
    weights,
    key,
    *,
    combine="ties",
    density=0.2,
    majority_sign_method="total",
    scale=1.0,
    output="delta",
    rank=None,
):
    """KnOTS (Stoica et al. 2024): align the tasks in one SVD basis, merge there.

    In (out, in) layout the paper takes `[dW_1^T ... dW_n^T] = U S [V_1^T ... V_n^T]`, so that
    `dW_i^T = U S V_i^T` with a shared U S. In our (in, out) layout, `dW_i = V_i S U^T`. The
    per-task `V_i` (in, R) are merged, `V = ties(w_i V_i)` (trim to `density`, elect sign,
    disjoint mean) or `V = sum_i w_i V_i` (combine="task_arithmetic"), and
    `dW = scale * V S U^T`. R = sum_i r_i; the SVD is taken from QRs of the factors (thin).
    """
    del key

    def node(nodes, _):
        scaled = [n["scale"].astype(F32) * n["lora_a"].astype(F32) for n in nodes]
        qrs = [jnp.linalg.qr(a) for a in scaled]
        q_b, r_b = jnp.linalg.qr(jnp.concatenate([n["lora_b"].astype(F32) for n in nodes]).T)
        core = mu.matmul(jax.scipy.linalg.block_diag(*[r for _, r in qrs]), r_b.T)
        u_core, s, vh_core = jnp.linalg.svd(core, full_matrices=False)
        offsets = [0]
        for q, _ in qrs:
            offsets.append(offsets[-1] + q.shape[1])
        per_task = jnp.stack(
            [mu.matmul(q, u_core[lo:hi]) for (q, _), lo, hi in zip(qrs, offsets, offsets[1:])]
        )
        weighted = per_task * weights[:, None, None]
        if combine == "ties":
            weighted = mu.magnitude_prune(per_task, density) * weights[:, None, None]
            merged = mu.disjoint_mean(
                weighted, mu.majority_sign_mask(weighted, majority_sign_method)
            )
        else:
            merged = mu.task_sum(weighted)
        return ("lowrank", scale * merged * s, mu.matmul(vh_core, q_b.T))

    return _delta_method(adapters, node, output, rank)
