"""Learned merging: merge coefficients fitted on a few unlabeled images (AdaMerging-style).

    merged, coefficients, history = learn_merge(
        model, base, [adapter_1, adapter_2], [head_1, head_2], [images_1, images_2],
        objective="output_match")
    params = lora.fold_into_base(base, merged)
    again = rebuild(adapters, coefficients, "core", "task_arithmetic")  # no relearning

Named presets (`PRESETS`, the names `jaxmerge.evaluate --merge` and the study take) live in
`jaxmerge.recipes.learned`, which also gathers the images from trained runs.

Fixed merges give every adapter one hand-picked weight. Here the weights are parameters
`lambda` of the merged update and are fitted by gradient descent (Yang et al. 2024,
"AdaMerging: Adaptive Model Merging for Multi-Task Learning"), with the base, the adapters and
every task head frozen. For adapters t = 1..n and a target layer l:

    task arithmetic   dW_l(lambda) = sum_t lambda_{t,l} s_t a_t b_t
    ties (AdaMerging++) dW_l(lambda) = sum_t lambda_{t,l} tau_{t,l},
                      tau_t = trim_density(dW_t) * [sign trim(dW_t) = elected sign]

`lambda_{t,l}` is shared by all layers ("task"), one per layer ("layer", AdaMerging's
layer-wise variant), or one per rank-one component of each adapter ("rank": `lambda_{t,l,k}`
scales the k-th column of `a_t`, task arithmetic only). "core" (task arithmetic only, beyond
AdaMerging) learns a full mixing matrix between the stacked factors,

    dW_l(M) = A_l M_l B_l,   A_l = [s_1 a_1, ..., s_n a_n] (in, R),  B_l = [b_1; ...; b_n] (R, out)

with M_l (R, R), R = sum_t r_t, initialised to `init * I` (the weighted sum). It stays in the
span of the adapters' input and output subspaces, so the merge keeps rank <= R and costs the
same as "rank", but it can also re-mix components across tasks (`a_i` with `b_j`), which is
what lets it undo interference that per-component scales cannot.

Objectives, each a sum over the tasks of a mean over that task's own images x ~ X_t (the
images a task was trained on, unlabeled; never the split that is scored):

    entropy        H(softmax(f_t(x; lambda)))          AdaMerging; classification heads only
    output_match   |f_t(x; lambda) - f_t(x; single_t)|^2 / var_t   every head kind; for
                   classification heads KL(softmax f_t(x; single_t) || softmax f_t(x; lambda))
                   (`match="kl"`) or the logit MSE (`match="mse"`)
    supervised     the head kind's training loss on a few labeled examples per task

where `f_t(x; lambda)` is task t's head on the merged backbone, `f_t(x; single_t)` the same
head on the backbone with task t's adapter alone (the "targets", computed once) and `var_t`
the variance of those targets (so that heads with small outputs, e.g. landmark coordinates,
weigh as much as logits).

Each call compiles one program (Adam steps in a `lax.scan`); calls with the same shapes, heads
and settings reuse it. Minibatches are drawn with an explicit key, so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import heads as heads_lib
from jaxmerge import lora
from jaxmerge.merging import ops as mu

Tree = Any
F32 = jnp.float32

OBJECTIVES = ("entropy", "output_match", "supervised")
GRANULARITIES = ("task", "layer", "rank", "core")
BASE_MERGES = ("task_arithmetic", "ties")
MATCHES = ("kl", "mse")
# The keyword settings of `learn_merge` that a named preset may set or a user override.
SETTINGS = (
    "objective",
    "granularity",
    "base_merge",
    "density",
    "steps",
    "learning_rate",
    "cosine",
    "init",
    "batch_size",
    "bounds",
    "match",
)


@dataclasses.dataclass(frozen=True)
class Head:
    """A frozen task head: its module, parameters, head kind and loss spec (`task.loss_spec`)."""

    head_def: Any
    params: Tree
    kind: str
    spec: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled program branches on (hashable, so jit caches per setting)."""

    model: Any
    head_defs: tuple
    kinds: tuple[str, ...]
    specs: tuple  # each spec as a sorted tuple of items
    paths: tuple[str, ...]
    objective: str
    granularity: str
    base_merge: str
    match: str
    steps: int
    batch_size: int
    learning_rate: float
    cosine: bool
    bounds: tuple[float | None, float | None]
    mesh: Any


# ----------------------------------------------------------------------------- merged trees


def _parts(adapters: Sequence[Tree], base_merge: str, density: float):
    """(paths, per-target arrays the merged update is a linear function of).

    task_arithmetic: {path: ([s_t a_t], [b_t])}, kept factored so the merged forward costs
    O(sum_t r_t) per token rather than a dense (in, out) matmul's gradient bookkeeping.
    ties: {path: tau (n, in, out)}, TIES' trim and sign election done once, up front: they do
    not depend on lambda (AdaMerging++ learns the weights of the TIES-processed task vectors and
    sums them; the disjoint mean's denominator is left to the learned weights).
    """
    items = [dict(lora.target_items(a)) for a in adapters]
    paths = tuple(items[0])
    parts = {}
    for path in paths:
        nodes = [it[path] for it in items]
        if base_merge == "task_arithmetic":
            parts[path] = (
                [n["scale"].astype(F32) * n["lora_a"].astype(F32) for n in nodes],
                [n["lora_b"].astype(F32) for n in nodes],
            )
        else:
            deltas = jnp.stack([lora.delta_of(n).astype(F32) for n in nodes])
            trimmed = mu.magnitude_prune(deltas, density)
            parts[path] = jnp.where(mu.majority_sign_mask(trimmed, "total"), trimmed, 0.0)
    return paths, parts


_ties_parts = jax.jit(
    lambda adapters, density: _parts(adapters, "ties", density)[1], static_argnums=1
)


def _coefficient(coefficients, granularity: str, path: str, t: int):
    """lambda for adapter t at target `path`: a scalar, or a (r_t,) vector ("rank")."""
    if granularity == "task":
        return coefficients[t]
    return coefficients[path][t]


def merged_tree(coefficients, parts, paths, granularity: str, base_merge: str) -> Tree:
    """The merged 'lora' tree for `coefficients`: factor nodes (task arithmetic, scale 1,
    a = [lambda_1 s_1 a_1, ..., lambda_n s_n a_n], b = [b_1; ...; b_n]) or delta nodes (ties,
    dW = sum_t lambda_t tau_t). Both are valid for `ViT.apply` and `lora.fold_into_base`."""
    tree: Tree = {}
    for path in paths:
        if base_merge == "task_arithmetic" and granularity == "core":
            scaled_a, bs = parts[path]
            a = mu.matmul(jnp.concatenate(scaled_a, axis=1), coefficients[path])
            node = {"lora_a": a, "lora_b": jnp.concatenate(bs, 0), "scale": jnp.ones((), F32)}
        elif base_merge == "task_arithmetic":
            scaled_a, bs = parts[path]
            a = jnp.concatenate(
                [
                    x * _coefficient(coefficients, granularity, path, t)
                    for t, x in enumerate(scaled_a)
                ],
                axis=1,
            )
            node = {"lora_a": a, "lora_b": jnp.concatenate(bs, 0), "scale": jnp.ones((), F32)}
        else:
            taus = parts[path]
            weights = jnp.stack(
                [_coefficient(coefficients, granularity, path, t) for t in range(taus.shape[0])]
            )
            node = {"delta": mu.weighted_sum(taus, weights)}
        tree = lora.set_at(tree, path, node)
    return tree


def init_coefficients(adapters: Sequence[Tree], granularity: str, init: float):
    """Every lambda set to `init`: an (n,) array ("task"), {path: (n,)} ("layer") or
    {path: [(r_t,) for each adapter]} ("rank")."""
    n, items = len(adapters), [dict(lora.target_items(a)) for a in adapters]
    if granularity == "task":
        return jnp.full((n,), init, F32)
    if granularity == "layer":
        return {path: jnp.full((n,), init, F32) for path in items[0]}
    if granularity == "core":
        sizes = {path: sum(it[path]["lora_a"].shape[1] for it in items) for path in items[0]}
        return {path: init * jnp.eye(r, dtype=F32) for path, r in sizes.items()}
    return {
        path: [jnp.full((it[path]["lora_a"].shape[1],), init, F32) for it in items]
        for path in items[0]
    }


def rebuild(
    adapters: Sequence[Tree],
    coefficients,
    granularity: str,
    base_merge: str = "task_arithmetic",
    density: float = 0.2,
) -> Tree:
    """The merged tree of `learn_merge` from saved coefficients (e.g. read back from JSON with
    `coefficients_from_json`), without relearning."""
    paths, parts = _parts(adapters, base_merge, density)
    dtype = lora.target_items(adapters[0])[0][1]["lora_a"].dtype
    tree = merged_tree(coefficients, parts, paths, granularity, base_merge)
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def coefficients_from_json(value, granularity: str) -> Any:
    """The inverse of `coefficients_to_json` for coefficients of `granularity`."""
    if granularity == "task":
        return jnp.asarray(value, F32)
    if granularity == "rank":
        return {path: [jnp.asarray(v, F32) for v in vs] for path, vs in value.items()}
    return {path: jnp.asarray(v, F32) for path, v in value.items()}


def coefficients_to_json(coefficients) -> Any:
    """The coefficients as nested lists and dicts, for json.dump."""
    return jax.tree.map(lambda x: np.asarray(x).tolist(), coefficients)


# ----------------------------------------------------------------------------- objectives


def _spec(items) -> dict:
    return dict(items)


def _outputs(static: _Static, coefficients, parts, base, head_params, images: list):
    """Each task's head outputs on the merged backbone, from one forward over all images."""
    tree = merged_tree(coefficients, parts, static.paths, static.granularity, static.base_merge)
    sizes = [x.shape[0] for x in images]
    pooled = static.model.apply({"params": base, "lora": tree}, jnp.concatenate(images))["pooled"]
    pieces = jnp.split(pooled, np.cumsum(sizes)[:-1])
    return [hd.apply({"params": hp}, f) for hd, hp, f in zip(static.head_defs, head_params, pieces)]


def _task_loss(static: _Static, t: int, outputs, target, scale):
    """One task's objective, a mean over its minibatch (see the module docstring)."""
    kind = static.kinds[t]
    if static.objective == "entropy":
        logp = jax.nn.log_softmax(outputs, -1)
        return -(jnp.exp(logp) * logp).sum(-1).mean()
    if static.objective == "supervised":
        return heads_lib.HEAD_KINDS[kind].loss(outputs, target, _spec(static.specs[t])).mean()
    if kind == "classification" and static.match == "kl":
        logp_single = jax.nn.log_softmax(target, -1)
        logp = jax.nn.log_softmax(outputs, -1)
        return (jnp.exp(logp_single) * (logp_single - logp)).sum(-1).mean()
    return jnp.square(outputs - target).mean() / scale


def _project(coefficients, bounds):
    low, high = bounds
    if low is None and high is None:
        return coefficients
    return jax.tree.map(lambda c: jnp.clip(c, low, high), coefficients)


def _objective(static: _Static, coefficients, parts, base, head_params, inputs, targets, scales):
    """The sum over tasks of each task's mean objective on the given images."""
    outputs = _outputs(static, coefficients, parts, base, head_params, inputs)
    return sum(
        _task_loss(static, t, o, y, s) for t, (o, y, s) in enumerate(zip(outputs, targets, scales))
    )


@functools.partial(jax.jit, static_argnums=0)
def _fit(static: _Static, coefficients, parts, base, head_params, inputs, targets, scales, key):
    """`static.steps` Adam steps on the coefficients; returns (coefficients, objective per step).

    Per step each task draws `batch_size` of its images without replacement (and the matching
    targets or labels); the objective is the sum over tasks of each task's mean.
    """
    learning_rate = static.learning_rate
    if static.cosine:  # large early steps leave the high-interference start fast, then settle
        learning_rate = optax.cosine_decay_schedule(static.learning_rate, static.steps)
    optimizer = optax.adam(learning_rate)

    def objective(coefficients, batch_inputs, batch_targets):
        return _objective(
            static, coefficients, parts, base, head_params, batch_inputs, batch_targets, scales
        )

    def step(carry, step_key):
        coefficients, opt_state = carry
        keys = jax.random.split(step_key, len(inputs))
        batch_inputs, batch_targets = [], []
        for k, x, y in zip(keys, inputs, targets):
            index = jax.random.choice(k, x.shape[0], (static.batch_size,), replace=False)
            x = x[index]
            if static.mesh is not None:  # data parallel over the mesh's devices
                x = jax.lax.with_sharding_constraint(x, NamedSharding(static.mesh, P("data")))
            batch_inputs.append(x)
            batch_targets.append(jax.tree.map(lambda v, i=index: v[i], y))
        value, grads = jax.value_and_grad(objective)(coefficients, batch_inputs, batch_targets)
        updates, opt_state = optimizer.update(grads, opt_state, coefficients)
        # Projected Adam: clipping after the update (rather than inside the forward, as
        # AdaMerging does) keeps a gradient for coefficients that sit on a bound.
        coefficients = _project(optax.apply_updates(coefficients, updates), static.bounds)
        return (coefficients, opt_state), value

    carry = (coefficients, optimizer.init(coefficients))
    (coefficients, _), history = jax.lax.scan(step, carry, jax.random.split(key, static.steps))
    return coefficients, history


# ----------------------------------------------------------------------------- public API


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_heads(model, head_def, base, adapter, head_params, images):
    pooled = model.apply({"params": base, "lora": adapter}, images)["pooled"]
    return head_def.apply({"params": head_params}, pooled)


def single_outputs(model, base, adapter: Tree, head, images, batch_size: int = 256) -> jax.Array:
    """The head's outputs on the backbone with `adapter` alone: output_match's targets.

    They depend on one task only, so a caller merging the same task in many combinations can
    compute them once and pass them to `learn_merge(targets=...)`.
    """
    head = _as_head(head)
    chunks = [
        _apply_heads(model, head.head_def, base, adapter, head.params, images[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]
    return jnp.concatenate(chunks)


def _as_head(head) -> Head:
    return head if isinstance(head, Head) else Head(*head)


def _setup(
    model,
    base,
    adapters,
    heads,
    inputs,
    *,
    objective,
    granularity,
    base_merge,
    density,
    steps,
    learning_rate,
    cosine,
    init,
    batch_size,
    bounds,
    match,
    targets,
    labels,
    mesh,
):
    """Checks every setting and input; returns (static settings, traced arguments of `_fit`)."""
    heads = [_as_head(h) for h in heads]
    n = len(adapters)
    _check(objective, OBJECTIVES, "objective")
    _check(granularity, GRANULARITIES, "granularity")
    _check(base_merge, BASE_MERGES, "base_merge")
    _check(match, MATCHES, "match")
    for field, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < float("inf")):
        raise ValueError(f"learning_rate: got {learning_rate!r}; allowed: a finite number > 0")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density: got {density!r}; allowed: a number in (0, 1]")
    if n < 1 or len(heads) != n or len(inputs) != n:
        raise ValueError(
            f"learn_merge: got {n} adapters, {len(heads)} heads and {len(inputs)} input sets; "
            "allowed: one head and one input set per adapter"
        )
    if granularity in ("rank", "core") and base_merge != "task_arithmetic":
        raise ValueError(
            f"granularity: {granularity!r} acts on the factors; allowed only with "
            "base_merge='task_arithmetic' (TIES' task vectors are dense)"
        )
    if granularity == "core" and bounds is not None and tuple(bounds) != (None, None):
        raise ValueError("bounds: 'core' mixing matrices are unbounded; pass bounds=None")
    for t, (head, x) in enumerate(zip(heads, inputs)):
        heads_lib.head_kind(head.kind)
        if objective == "entropy" and head.kind != "classification":
            raise ValueError(
                f"objective: 'entropy' needs classification heads (a softmax to take the entropy "
                f"of); heads[{t}] is a {head.kind!r} head; use objective='output_match'"
            )
        if x.shape[0] < batch_size:
            raise ValueError(
                f"inputs[{t}]: has {x.shape[0]} images; allowed: at least batch_size={batch_size}"
            )
    if mesh is not None and (n * batch_size) % mesh.size:
        raise ValueError(
            f"batch_size: {n} x {batch_size} images do not split over {mesh.size} devices"
        )

    inputs = [jnp.asarray(x, F32) for x in inputs]
    scales = [jnp.ones((), F32)] * n
    if objective == "output_match":
        if targets is None:
            targets = [
                single_outputs(model, base, a, h, x) for a, h, x in zip(adapters, heads, inputs)
            ]
        targets = [jnp.asarray(y, F32) for y in targets]
        # Normalising by the targets' variance weighs every head alike whatever its units.
        scales = [jnp.maximum(y.var(0).mean(), 1e-8) for y in targets]
    elif objective == "supervised":
        if labels is None:
            raise ValueError("labels: objective='supervised' needs per-task labels")
        targets = [{k: jnp.asarray(v) for k, v in dict(y).items()} for y in labels]
    else:
        targets = [jnp.zeros((x.shape[0],), F32) for x in inputs]  # unused placeholders

    if base_merge == "ties":
        paths = tuple(p for p, _ in lora.target_items(adapters[0]))
        parts = _ties_parts(list(adapters), float(density))
    else:
        paths, parts = _parts(adapters, base_merge, density)
    static = _Static(
        model=model,
        head_defs=tuple(h.head_def for h in heads),
        kinds=tuple(h.kind for h in heads),
        specs=tuple(tuple(sorted((k, _hashable(v)) for k, v in h.spec.items())) for h in heads),
        paths=paths,
        objective=objective,
        granularity=granularity,
        base_merge=base_merge,
        match=match,
        steps=int(steps),
        batch_size=int(batch_size),
        learning_rate=float(learning_rate),
        cosine=bool(cosine),
        bounds=tuple(bounds) if bounds is not None else (None, None),
        mesh=mesh,
    )
    coefficients = init_coefficients(adapters, granularity, init)
    args = (coefficients, parts, base, [h.params for h in heads], inputs, targets, scales)
    if mesh is not None:
        args = jax.device_put(args, NamedSharding(mesh, P()))
    return static, args


def learn_merge(
    model,
    base: Tree,
    adapters: Sequence[Tree],
    heads: Sequence[Any],
    inputs: Sequence[Any],
    *,
    objective: str,
    granularity: str = "core",
    base_merge: str = "task_arithmetic",
    density: float = 0.2,
    steps: int = 300,
    learning_rate: float = 0.02,
    cosine: bool = False,
    init: float = 1.0,
    batch_size: int = 16,
    bounds: tuple[float | None, float | None] | None = None,
    match: str = "kl",
    key: jax.Array | None = None,
    targets: Sequence[Any] | None = None,
    labels: Sequence[Mapping[str, Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Fits merge coefficients of `adapters` on unlabeled `inputs`; returns the merged tree.

    Args:
      model: the ViT module the adapters were trained on.
      base: its frozen base parameters.
      adapters: n factored adapters over the same targets.
      heads: per adapter, its task head as a `Head` or a tuple (head_def, params, kind, spec).
      inputs: per adapter, images of its task (N_t, H, W, C), preprocessed as for evaluation;
        from the training split, never the split that will be scored. N_t >= batch_size.
      objective: "entropy", "output_match" or "supervised" (see the module docstring).
      granularity: "task", "layer", or (task arithmetic only) "rank" or "core" (the default:
        it fits best, see the module docstring).
      base_merge: "task_arithmetic" or "ties".
      density: the fraction of each task vector TIES keeps.
      steps, learning_rate, batch_size: Adam steps, step size, images per task per step.
      cosine: decay the step size to 0 along a cosine over the steps.
      init: the starting value of every lambda (1.0 = the plain sum of the adapters).
      bounds: (low, high) the lambdas are projected onto after each step (AdaMerging keeps
        them in (0, 1)); None = unbounded. Not for "core", whose off-diagonal entries start at 0
        and must be free to go negative.
      match: "kl" or "mse", how output_match compares classification heads.
      key: a jax.random key for the minibatches (default key(0)).
      targets: output_match's per-task targets, aligned with `inputs` (`single_outputs`);
        computed here when None.
      labels: supervised only: per task, {target name: (N_t, ...) labels} aligned with inputs.
      mesh: a ('data',) mesh to split each minibatch over (multi-device CPU); None = one device.

    Returns:
      (merged tree for `lora.fold_into_base`, coefficients (see `init_coefficients`),
       objective history (steps,) as numpy).

    Raises:
      ValueError: for a bad setting, mismatched lengths, or entropy with a non-classification
        head.
    """
    adapters = lora.on_common_targets(adapters)
    static, args = _setup(
        model,
        base,
        adapters,
        heads,
        inputs,
        objective=objective,
        granularity=granularity,
        base_merge=base_merge,
        density=density,
        steps=steps,
        learning_rate=learning_rate,
        cosine=cosine,
        init=init,
        batch_size=batch_size,
        bounds=bounds,
        match=match,
        targets=targets,
        labels=labels,
        mesh=mesh,
    )
    key = jax.random.key(0) if key is None else key
    coefficients, history = _fit(static, *args, key)
    tree = merged_tree(coefficients, args[1], static.paths, granularity, base_merge)
    dtype = lora.target_items(adapters[0])[0][1]["lora_a"].dtype
    tree = jax.tree.map(lambda x: x.astype(dtype), tree)
    return tree, jax.device_get(coefficients), np.asarray(history)


def objective_function(model, base, adapters, heads, inputs, **settings):
    """(f, coefficients at init): `f(coefficients)` is `learn_merge`'s objective for these
    settings (its keywords) over *all* of `inputs` at once, for checks and plots."""
    settings = {**_DEFAULTS, **settings}
    static, args = _setup(model, base, adapters, [_as_head(h) for h in heads], inputs, **settings)
    coefficients, parts, base, head_params, inputs, targets, scales = args

    def f(c):
        return _objective(static, c, parts, base, head_params, inputs, targets, scales)

    return f, coefficients


_DEFAULTS = dict(
    granularity="core",
    base_merge="task_arithmetic",
    density=0.2,
    steps=300,
    learning_rate=0.02,
    cosine=False,
    init=1.0,
    batch_size=16,
    bounds=None,
    match="kl",
    targets=None,
    labels=None,
    mesh=None,
)


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed: one of {list(allowed)}")
