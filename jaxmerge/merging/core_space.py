"""Core Space merging (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model
Merging in Core Space"): any method of the registry run on small per-task cores in a basis
shared by the tasks' LoRA factors, then mapped back. Registered as `core_<method>`, e.g.
`merging.merge(adapters, "core_tsv")`, with the parameters and checks of `<method>`.

In jaxmerge's (in, out) layout `dW_t = s_t a_t b_t` (the paper's `B A` transposed). Per target,
the reference bases are the left singular vectors of the stacked factors,

    [a_1 ... a_T] = U_a S_a P_a^T  (in, R),    [b_1; ...; b_T]^T = U_b S_b P_b^T  (out, R),

R = sum_t r_t (ranks may differ). Every `a_t` lies in span(U_a) and every `b_t^T` in span(U_b),
so `dW_t = U_a M_t U_b^T` exactly, with the core `M_t = U_a^T dW_t U_b` of shape at most
(R, R). The method runs on the cores, each given as the rank-r_t factors `(U_a^T a_t, b_t U_b)`
with its own scale and weight, so it sees the true ranks; its merged core `M` is mapped back,
`dW = U_a M U_b^T`. Methods linear in the tasks (task arithmetic) give exactly their full-space
result; the SVD methods (Iso-C, Iso-CTS, TSV-M) commute with the orthonormal bases, so they give
theirs wherever they count directions the same way (their `min(in, out)` becomes the core's
min(in, out, R): TSV-M keeps R / T pairs per task here); elementwise methods (TIES, DARE,
Breadcrumbs) and WUDI's Adam steps depend on the basis, which is the point of the paper: the
cores of the tasks are aligned, and their entries are compared coordinate by coordinate. The
result has rank <= R and lies in the span of the adapters, whatever the method.

The bases are SVDs (not QRs) of the stored factors, unweighted: they do not depend on the order
of the tasks or on the merge weights. Where the stacked factors have repeated singular values
(or rank below R) the basis is not unique and the elementwise methods inherit that freedom.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from jaxmerge import lora
from jaxmerge.merging import factorize as fz
from jaxmerge.merging import targets as mt
from jaxmerge.merging.ops import matmul
from jaxmerge.merging.registry import METHODS, register

F32 = jnp.float32
# The methods that get a core variant: every data-free method that merges dense updates and
# returns one (`output`, `rank`, `scale` as in `merging.delta`). PEFT's methods return factors
# by their own conventions, and KnOTS is itself an alignment space.
CORE_METHODS = (
    "task_arithmetic",
    "ties_delta",
    "dare_delta",
    "breadcrumbs",
    "iso_c",
    "iso_cts",
    "tsv",
    "wudi",
)
PREFIX = "core_"


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _left_singular_vectors(a, bt):
    """`U_a` (G, in, ka), `U_b` (G, out, kb) of the thin SVDs of `a` (G, in, R) and `bt`
    (G, out, R): one batched LAPACK call where in == out, else two chained by `fz._after`."""
    if a.shape == bt.shape:
        u, _, _ = jnp.linalg.svd(jnp.concatenate([a, bt]), full_matrices=False)
        return u[: a.shape[0]], u[a.shape[0] :]
    u_a, s_a, _ = jnp.linalg.svd(a, full_matrices=False)
    u_b, _, _ = jnp.linalg.svd(fz._after(bt, s_a.min()), full_matrices=False)
    return u_a, u_b


def _layouts(nodes):
    """{((in, out), ranks): [target indices]}: targets that share one batched SVD."""
    layouts: dict[tuple, list[int]] = {}
    for index, target in enumerate(nodes):
        shape = (target[0]["lora_a"].shape[0], target[0]["lora_b"].shape[1])
        ranks = tuple(node["lora_a"].shape[1] for node in target)
        layouts.setdefault((shape, ranks), []).append(index)
    return layouts


def core_adapters(adapters):
    """The adapters in core space: `(cores, bases)`, `cores` one adapter per task with node
    `{lora_a: U_a^T a_t, lora_b: b_t U_b, scale: s_t}` (float32) at each target's path, and
    `bases[i] = (U_a, U_b)` of target i (in `lora.target_items` order)."""
    paths, nodes, _ = mt.targets(adapters)
    bases, projected, token = [None] * len(nodes), [None] * len(nodes), None
    for (_, ranks), indices in _layouts(nodes).items():
        a = jnp.stack(
            [jnp.concatenate([n["lora_a"].astype(F32) for n in nodes[i]], 1) for i in indices]
        )
        bt = jnp.stack(
            [jnp.concatenate([n["lora_b"].astype(F32) for n in nodes[i]], 0).T for i in indices]
        )
        if token is not None:  # one group's LAPACK calls at a time (see `fz._after`)
            a, bt = fz._after(a, token), fz._after(bt, token)
        u_a, u_b = _left_singular_vectors(a, bt)
        token = jnp.abs(u_a[:, 0, 0]).min()
        a_core, b_core = matmul(_swap(u_a), a), _swap(matmul(_swap(u_b), bt))
        for j, i in enumerate(indices):
            bases[i] = (u_a[j], u_b[j])
            starts = [sum(ranks[:t]) for t in range(len(ranks) + 1)]
            projected[i] = [
                {
                    "lora_a": a_core[j][:, lo:hi],
                    "lora_b": b_core[j][lo:hi],
                    "scale": jnp.asarray(node["scale"], F32),
                }
                for node, lo, hi in zip(nodes[i], starts, starts[1:])
            ]
    cores = [mt.tree(paths, [p[t] for p in projected]) for t in range(len(adapters))]
    return cores, bases


def _from_core(adapters, merged_cores, bases, output, rank):
    """`dW = U_a M U_b^T` per target as `output`: `{"delta": dW}` nodes, or rank-`rank`
    factors (default: every direction of the core, so exact) of the SVD `U_a u, s, (U_b v)^T`
    from the (ka, kb) core's SVD."""
    paths, nodes, _ = mt.targets(adapters)
    merged = [node["delta"].astype(F32) for _, node in lora.target_items(merged_cores)]
    dtypes = [n[0]["lora_a"].dtype for n in nodes]
    if output == "delta":
        out = [
            {"delta": matmul(matmul(u_a, m), u_b.T).astype(t)}
            for (u_a, u_b), m, t in zip(bases, merged, dtypes)
        ]
        return mt.tree(paths, out)
    out, token = [None] * len(nodes), None
    shapes: dict[tuple, list[int]] = {}
    for index, m in enumerate(merged):
        shapes.setdefault(m.shape, []).append(index)
    for indices in shapes.values():
        stacked = jnp.stack([merged[i] for i in indices])
        if token is not None:
            stacked = fz._after(stacked, token)
        u, s, vh = jnp.linalg.svd(stacked, full_matrices=False)
        token = s.min()
        for j, i in enumerate(indices):
            u_a, u_b = bases[i]
            triplet = (matmul(u_a, u[j]), s[j], matmul(vh[j], u_b.T))
            out[i] = mt.factored_node(triplet, rank or s.shape[1], None, dtypes[i])
    return mt.tree(paths, out)


def merge_in_core(adapters, weights, key, method: str, params: dict):
    """`method` (a name in `CORE_METHODS`) with `params` run on the adapters' cores; the result
    mapped back as `params["output"]` of rank `params["rank"]` (see the module docstring)."""
    cores, bases = core_adapters(adapters)
    inner = {**params, "output": "delta", "rank": None}
    merged_cores, _ = METHODS[method].jitted(cores, weights, key, **inner)
    return _from_core(adapters, merged_cores, bases, params["output"], params["rank"])


def _register_core_variant(method: str) -> None:
    """Registers `core_<method>`: `method`'s parameters, checks and needs, run in core space."""
    spec = METHODS[method]

    def merge_variant(adapters, weights, key, **params):
        return merge_in_core(adapters, weights, key, method, params)

    positional = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name in ("adapters", "weights", "key")
    ]
    keywords = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in spec.params.items()
    ]
    # `register` reads the keyword parameters, and jit the static ones, from this signature.
    merge_variant.__signature__ = inspect.Signature(positional + keywords)
    merge_variant.__name__ = PREFIX + method
    merge_variant.__doc__ = (
        f"Core Space (Panariello et al., NeurIPS 2025) `{method}`: `{method}` on the per-task "
        f"cores `M_t = U_a^T dW_t U_b` in the SVD bases of the stacked factors, mapped back "
        f'as `U_a M U_b^T` (rank <= sum of ranks). `output="factored"` keeps rank `rank`, '
        f"by default every direction (exact). Parameters as in `{method}`:\n\n{spec.doc}"
    )
    register(
        PREFIX + method,
        checks=spec.checks,
        check_together=spec.check_together,
        equal_ranks=spec.equal_ranks,
        needs_key=spec.needs_key,
    )(merge_variant)


for _method in CORE_METHODS:
    _register_core_variant(_method)
