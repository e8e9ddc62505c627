"""A fused multi-task model: every adapter kept apart in one backbone, with learned gates.

At each adapted layer l the fused backbone computes

    h = x W + bias + sum_t g_{l,t}(x) s_t (x a_t) b_t,

the base, the adapters and every task head frozen, and only the gates learned (the adapters
live in an `adapter_stack`). Three gatings:

    static   g_{l,t}: one number per layer and adapter (the branch form of a layer-wise learned
             merge, kept unfolded; `adapter_stack.fold_gates` folds it into one matrix)
    router   g_{l,t}(x) = mean_tokens(x_l) @ K_l + c_l: a linear router at every target on the
             layer's own input, one gate per image; K_l starts at 0 and c_l at the static
             gates, so the router starts where the static fusion ended
    mixture  g_l(x) = softmax(mean_tokens(x_l) @ K_l + c_l) @ T_l: a router at every target
             that takes each image for one of the n tasks, and a table T_l (n, R) whose row d
             holds a gate per rank column (R = sum_t r_t) for an image of task d. T_l starts
             at the adapters' one-hot columns (an image taken for task d runs adapter d
             alone) and K_l, c_l at 0. A gate per rank column rather than per adapter lets
             tasks that share their images keep more of each adapter (measured: digits and
             digits_value, 0.971 of their single adapters against 0.938)

All are fitted label-free by output matching (as `learned`'s objective="output_match"):
on each task's own training images x ~ X_t, task t's head on the fused backbone is pulled to
the same head on the backbone with adapter t alone,

    sum_t mean_{x ~ X_t} KL(softmax f_t(x; single_t) || softmax f_t(x; fused))   (classification)
                         |f_t(x; fused) - f_t(x; single_t)|^2 / var_t            (other heads)

and a mixture's routers also by the cross-entropy of taking each image for its own task,
averaged over the targets: which task set an image came from is known without any label, and
images of tasks that share their inputs (two heads on one dataset) are left to the table.

    gates, history = fusion.learn_gates(model, base, stacked, heads, inputs, gating="static")
    tree = fusion.fused_tree(stacked, gates, "static")
    outputs = fusion.fused_forward(model, head_defs, base, tree, head_params, images)

One compiled pass of the fused backbone feeds every head (`fused_forward`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxmerge import adapter_stack, learned, lora

Tree = Any
F32 = jnp.float32
GATINGS = ("static", "router", "mixture")
ROUTERS = ("router", "mixture")
MATCHES = ("kl", "mse")


def init_gates(stacked: Tree, gating: str, init: float | Tree = 1.0) -> Tree:
    """Starting gates: static {path: (n,) filled with `init`}; router {path: {"kernel": 0
    (in, n), "bias": init}}, where `init` may be a static gate tree (the router then starts as
    that static fusion); mixture {path: {"kernel": 0, "bias": 0, "table": one-hot (n, R)}}."""
    _check(gating, GATINGS, "gating")
    n = adapter_stack.size(stacked)
    items = lora.target_items(stacked)

    def static(path):
        if isinstance(init, dict):
            return jnp.asarray(init[path], F32)
        return jnp.full((n,), init, F32)

    if gating == "static":
        return {path: static(path) for path, _ in items}
    if gating == "mixture":
        return {
            path: {
                "kernel": jnp.zeros((node["lora_a"].shape[0], n), F32),
                "bias": jnp.zeros((n,), F32),
                "table": node["gate_expand"],
            }
            for path, node in items
        }
    return {
        path: {"kernel": jnp.zeros((node["lora_a"].shape[0], n), F32), "bias": static(path)}
        for path, node in items
    }


def fused_tree(stacked: Tree, gates: Tree, gating: str) -> Tree:
    """The 'lora' tree of the fused backbone for `gates` (see `init_gates`)."""
    if gating == "static":
        return adapter_stack.with_gates(stacked, gates)
    return adapter_stack.with_router(stacked, gates)  # router and mixture


def check_gates(stacked: Tree, gates: Tree, gating: str, name: str = "gates") -> None:
    """Raises ValueError unless `gates` has the paths and shapes `init_gates` gives `stacked`
    (e.g. a router saved for other adapters)."""
    want = init_gates(stacked, gating)
    if set(gates) != set(want):
        raise ValueError(
            f"{name}: targets {sorted(gates)[:3]}... do not match the adapters' "
            f"{sorted(want)[:3]}... ({len(gates)} vs {len(want)}); allowed: gates learned for "
            "these adapters"
        )
    for path in want:
        got_shapes = jax.tree.map(jnp.shape, gates[path])
        want_shapes = jax.tree.map(jnp.shape, want[path])
        if got_shapes != want_shapes:
            raise ValueError(
                f"{name}[{path!r}]: shapes {got_shapes}; allowed: {want_shapes} ({gating} gates "
                f"of {adapter_stack.size(stacked)} adapters)"
            )


def route_logits_of(sown: Tree) -> list[jax.Array]:
    """The (B, n) logits every mixture router sowed in a forward applied with
    `mutable=["intermediates"]`, one array per target, in path order."""
    flat = traverse_util.flatten_dict(sown.get("intermediates", {}))
    return [
        value
        for key, values in sorted(flat.items())
        if key[-1] == "route_logits"
        for value in values
    ]


def fused_forward(model, head_defs: Sequence, base: Tree, tree: Tree, head_params, images):
    """(outputs of every head on the fused backbone), one forward: [head_t(pooled)]."""
    pooled = model.apply({"params": base, "lora": tree}, images)["pooled"]
    return [h.apply({"params": p}, pooled) for h, p in zip(head_defs, head_params)]


@dataclasses.dataclass(frozen=True)
class _Static:
    model: Any
    head_defs: tuple
    kinds: tuple[str, ...]
    gating: str
    match: str
    steps: int
    batch_size: int
    learning_rate: float


def _task_loss(kind: str, match: str, outputs, target, scale):
    if kind == "classification" and match == "kl":
        logp_single = jax.nn.log_softmax(target, -1)
        return (jnp.exp(logp_single) * (logp_single - jax.nn.log_softmax(outputs, -1))).sum(-1)
    return jnp.square(outputs - target).reshape(outputs.shape[0], -1).mean(-1) / scale


def _objective(static: _Static, gates, stacked, base, head_params, inputs, targets, scales):
    """sum_t mean over task t's images of its output-matching loss, plus a mixture's routing
    cross-entropy (module docstring)."""
    tree = fused_tree(stacked, gates, static.gating)
    sizes = [x.shape[0] for x in inputs]
    pooled, sown = static.model.apply(
        {"params": base, "lora": tree}, jnp.concatenate(inputs), mutable=["intermediates"]
    )
    pieces = jnp.split(pooled["pooled"], np.cumsum(sizes)[:-1])
    total = 0.0
    if static.gating == "mixture":
        task_of_image = jnp.repeat(jnp.arange(len(sizes)), np.asarray(sizes))
        route_logits = route_logits_of(sown)
        total = sum(
            optax.softmax_cross_entropy_with_integer_labels(logits, task_of_image).mean()
            for logits in route_logits
        ) / len(route_logits)
    for t, (hd, hp, f) in enumerate(zip(static.head_defs, head_params, pieces)):
        outputs = hd.apply({"params": hp}, f)
        loss = _task_loss(static.kinds[t], static.match, outputs, targets[t], scales[t])
        total = total + loss.mean()
    return total


@functools.partial(jax.jit, static_argnums=0)
def _fit(static: _Static, gates, stacked, base, head_params, inputs, targets, scales, key):
    optimizer = optax.adam(static.learning_rate)

    def step(carry, step_key):
        gates, opt_state = carry
        keys = jax.random.split(step_key, len(inputs))
        picks = [
            jax.random.choice(k, x.shape[0], (static.batch_size,), replace=False)
            for k, x in zip(keys, inputs)
        ]
        batch = [x[i] for x, i in zip(inputs, picks)]
        batch_targets = [y[i] for y, i in zip(targets, picks)]
        value, grads = jax.value_and_grad(_objective, argnums=1)(
            static, gates, stacked, base, head_params, batch, batch_targets, scales
        )
        updates, opt_state = optimizer.update(grads, opt_state, gates)
        return (optax.apply_updates(gates, updates), opt_state), value

    carry = (gates, optimizer.init(gates))
    (gates, _), history = jax.lax.scan(step, carry, jax.random.split(key, static.steps))
    return gates, history


def learn_gates(
    model,
    base: Tree,
    stacked: Tree,
    heads: Sequence[Any],
    inputs: Sequence[Any],
    *,
    gating: str = "static",
    init: float | Tree = 1.0,
    steps: int = 300,
    learning_rate: float = 0.02,
    batch_size: int = 16,
    match: str = "kl",
    targets: Sequence[Any] | None = None,
    key: jax.Array | None = None,
):
    """Fits the fused model's gates by output matching; returns (gates, objective per step).

    Args:
      model, base: the model definition and the frozen base parameters.
      stacked: the adapters' stack (`adapter_stack.stack`), adapter t for task t.
      heads: per adapter, its frozen head as `learned.Head` or (head_def, params, kind, spec).
      inputs: per adapter, (N_t, H, W, C) unlabeled training images of its task.
      gating: one of GATINGS; `init` as in `init_gates`.
      targets: per task, its head's outputs with its adapter alone (`learned.single_outputs`),
        aligned with `inputs`; computed here when None.
    """
    _check(gating, GATINGS, "gating")
    _check(match, MATCHES, "match")
    heads = [h if isinstance(h, learned.Head) else learned.Head(*h) for h in heads]
    n = adapter_stack.size(stacked)
    if len(heads) != n or len(inputs) != n:
        raise ValueError(
            f"learn_gates: got {n} stacked adapters, {len(heads)} heads and {len(inputs)} input "
            "sets; allowed: one head and one input set per adapter"
        )
    for field, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    for t, x in enumerate(inputs):
        if x.shape[0] < batch_size:
            raise ValueError(f"inputs[{t}]: {x.shape[0]} images; allowed: >= batch_size")
    if isinstance(init, dict):
        check_gates(stacked, init, "static", "init")
    inputs = [jnp.asarray(x, F32) for x in inputs]
    if targets is None:
        singles = _singles(stacked)
        targets = [
            learned.single_outputs(model, base, singles[t], heads[t], inputs[t]) for t in range(n)
        ]
    targets = [jnp.asarray(y, F32) for y in targets]
    scales = [jnp.maximum(y.var(0).mean(), 1e-8) for y in targets]
    static = _Static(
        model,
        tuple(h.head_def for h in heads),
        tuple(h.kind for h in heads),
        gating,
        match,
        int(steps),
        int(batch_size),
        float(learning_rate),
    )
    gates = init_gates(stacked, gating, init)
    key = jax.random.key(0) if key is None else key
    gates, history = _fit(
        static, gates, stacked, base, [h.params for h in heads], inputs, targets, scales, key
    )
    return jax.device_get(gates), np.asarray(history)


def _singles(stacked: Tree) -> list[Tree]:
    """Each adapter of the stack alone (a one-hot static gate, folded to plain factors)."""
    n = adapter_stack.size(stacked)
    eye = jnp.eye(n, dtype=F32)
    return [adapter_stack.fold_gates(adapter_stack.with_gates(stacked, eye[t])) for t in range(n)]


def gates_to_json(gates: Tree) -> Any:
    return jax.tree.map(lambda x: np.asarray(x).tolist(), gates)


def gates_from_json(value: Any) -> Tree:
    return jax.tree.map(lambda x: jnp.asarray(x, F32), value, is_leaf=lambda x: isinstance(x, list))


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed: one of {list(allowed)}")
