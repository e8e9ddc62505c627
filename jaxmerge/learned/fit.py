"""Learned merging: merge coefficients fitted on a few unlabeled images (AdaMerging-style).

    merged, coefficients, history = learn_merge(
        model, base, [adapter_1, adapter_2], [head_1, head_2], [images_1, images_2],
        objective="output_match")
    params = lora.fold_into_base(base, merged)
    again = rebuild(adapters, coefficients, "core", "task_arithmetic")  # no relearning

Fixed merges give every adapter one hand-picked weight. Here the weights are parameters
`lambda` of the merged update (`jaxmerge.learned.coefficients`) and are fitted by gradient
descent (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"), with
the base, the adapters and every task head frozen. `lambda_{t,l}` is shared by all layers
("task"), one per layer ("layer", AdaMerging's layer-wise variant), or one per rank-one
component of each adapter ("rank", task arithmetic only). "core" (task arithmetic only, beyond
AdaMerging) learns a full mixing matrix M_l between the stacked factors, initialised to
`init * I` (the weighted sum): it stays in the span of the adapters' input and output
subspaces, so the merge keeps rank <= R = sum_t r_t and costs the same as "rank", but it can
also re-mix components across tasks (`a_i` with `b_j`), which is what lets it undo
interference that per-component scales cannot.

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

Each call compiles one program (Adam steps in a `lax.scan`, `jaxmerge.learned.adam`); calls
with the same shapes, heads and settings reuse it. Minibatches are drawn with an explicit key,
so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import heads as heads_lib
from jaxmerge import layer_inputs, lora
from jaxmerge.learned import coefficients as co
from jaxmerge.learned.adam import adam_scan
from jaxmerge.learned.settings import Settings

Tree = Any
F32 = jnp.float32


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
    settings: Settings
    mesh: Any


def _outputs(static: _Static, coefficients, parts, base, head_params, images: list):
    """Each task's head outputs on the merged backbone, from one forward over all images."""
    s = static.settings
    tree = co.merged_tree(coefficients, parts, static.paths, s.granularity, s.base_merge)
    sizes = [x.shape[0] for x in images]
    pooled = static.model.apply({"params": base, "lora": tree}, jnp.concatenate(images))["pooled"]
    pieces = jnp.split(pooled, np.cumsum(sizes)[:-1])
    return [hd.apply({"params": hp}, f) for hd, hp, f in zip(static.head_defs, head_params, pieces)]


def _task_loss(static: _Static, t: int, outputs, target, scale):
    """One task's objective, a mean over its minibatch (see the module docstring)."""
    kind, s = static.kinds[t], static.settings
    if s.objective == "entropy":
        logp = jax.nn.log_softmax(outputs, -1)
        return -(jnp.exp(logp) * logp).sum(-1).mean()
    if s.objective == "supervised":
        return heads_lib.HEAD_KINDS[kind].loss(outputs, target, dict(static.specs[t])).mean()
    if kind == "classification" and s.match == "kl":
        logp_single = jax.nn.log_softmax(target, -1)
        logp = jax.nn.log_softmax(outputs, -1)
        return (jnp.exp(logp_single) * (logp_single - logp)).sum(-1).mean()
    return jnp.square(outputs - target).mean() / scale


def _objective(static: _Static, coefficients, parts, base, head_params, inputs, targets, scales):
    """The sum over tasks of each task's mean objective on the given images."""
    outputs = _outputs(static, coefficients, parts, base, head_params, inputs)
    return sum(
        _task_loss(static, t, o, y, s) for t, (o, y, s) in enumerate(zip(outputs, targets, scales))
    )


def _project(bounds):
    low, high = bounds
    if low is None and high is None:
        return None
    return lambda coefficients: jax.tree.map(lambda c: jnp.clip(c, low, high), coefficients)


@functools.partial(jax.jit, static_argnums=0)
def _fit(static: _Static, coefficients, parts, base, head_params, inputs, targets, scales, key):
    """`steps` Adam steps on the coefficients; returns (coefficients, objective per step).

    Per step each task draws `batch_size` of its images without replacement (and the matching
    targets or labels); the objective is the sum over tasks of each task's mean.
    """
    s = static.settings

    def loss(coefficients, step_key):
        keys = jax.random.split(step_key, len(inputs))
        batch_inputs, batch_targets = [], []
        for k, x, y in zip(keys, inputs, targets):
            index = jax.random.choice(k, x.shape[0], (s.batch_size,), replace=False)
            x = x[index]
            if static.mesh is not None:  # data parallel over the mesh's devices
                x = jax.lax.with_sharding_constraint(x, NamedSharding(static.mesh, P("data")))
            batch_inputs.append(x)
            batch_targets.append(jax.tree.map(lambda v, i=index: v[i], y))
        return _objective(
            static, coefficients, parts, base, head_params, batch_inputs, batch_targets, scales
        )

    return adam_scan(
        loss, coefficients, key, s.steps, s.learning_rate, s.cosine, _project(s.bounds)
    )


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


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _setup(model, base, adapters, heads, inputs, settings: Settings, targets, labels, mesh):
    """Checks every input against the settings; returns (static, traced arguments of `_fit`)."""
    heads = [_as_head(h) for h in heads]
    n, s = len(adapters), settings
    if n < 1 or len(heads) != n or len(inputs) != n:
        raise ValueError(
            f"learn_merge: got {n} adapters, {len(heads)} heads and {len(inputs)} input sets; "
            "allowed: one head and one input set per adapter"
        )
    for t, (head, x) in enumerate(zip(heads, inputs)):
        heads_lib.head_kind(head.kind)
        if s.objective == "entropy" and head.kind != "classification":
            raise ValueError(
                f"objective: 'entropy' needs classification heads (a softmax to take the entropy "
                f"of); heads[{t}] is a {head.kind!r} head; use objective='output_match'"
            )
        if x.shape[0] < s.batch_size:
            raise ValueError(
                f"inputs[{t}]: has {x.shape[0]} images; allowed: at least batch_size={s.batch_size}"
            )
    if mesh is not None and (n * s.batch_size) % mesh.size:
        raise ValueError(
            f"batch_size: {n} x {s.batch_size} images do not split over {mesh.size} devices"
        )

    inputs = [jnp.asarray(x, F32) for x in inputs]
    scales = [jnp.ones((), F32)] * n
    if s.objective == "output_match":
        if targets is None:
            targets = [
                single_outputs(model, base, a, h, x) for a, h, x in zip(adapters, heads, inputs)
            ]
        targets = [jnp.asarray(y, F32) for y in targets]
        # Normalising by the targets' variance weighs every head alike whatever its units.
        scales = [jnp.maximum(y.var(0).mean(), 1e-8) for y in targets]
    elif s.objective == "supervised":
        if labels is None:
            raise ValueError("labels: objective='supervised' needs per-task labels")
        targets = [{k: jnp.asarray(v) for k, v in dict(y).items()} for y in labels]
    else:
        targets = [jnp.zeros((x.shape[0],), F32) for x in inputs]  # unused placeholders

    if s.base_merge == "ties":
        paths = tuple(p for p, _ in lora.target_items(adapters[0]))
        parts = co.ties_parts(list(adapters), float(s.density))
    else:
        paths, parts = co.parts_of(adapters, s.base_merge, s.density)
    static = _Static(
        model=model,
        head_defs=tuple(h.head_def for h in heads),
        kinds=tuple(h.kind for h in heads),
        specs=tuple(tuple(sorted((k, _hashable(v)) for k, v in h.spec.items())) for h in heads),
        paths=paths,
        settings=s,
        mesh=mesh,
    )
    if s.start == "regmean":
        coefficients = _regmean_start(model, base, adapters, inputs, paths, parts, s)
    else:
        coefficients = co.init_coefficients(adapters, s.granularity, s.init)
    args = (coefficients, parts, base, [h.params for h in heads], inputs, targets, scales)
    if mesh is not None:
        args = jax.device_put(args, NamedSharding(mesh, P()))
    return static, args


def _regmean_start(model, base, adapters, inputs, paths, parts, settings: Settings):
    """{path: init * core_regmean}: each task's Grams on its own model and its own images."""
    grams = [layer_inputs.input_grams(model, base, a, x, paths) for a, x in zip(adapters, inputs)]
    return {
        path: settings.init
        * co.core_regmean(
            parts[path][0], [g[path] for g in grams], settings.reduce_non_diagonal_ratio
        )
        for path in paths
    }


def _settings(settings: Settings | None, overrides: Mapping[str, Any]) -> Settings:
    """`settings` (default: the defaults) with keyword overrides, checked."""
    return (settings or Settings()).replace(**overrides)


def learn_merge(
    model,
    base: Tree,
    adapters: Sequence[Tree],
    heads: Sequence[Any],
    inputs: Sequence[Any],
    settings: Settings | None = None,
    *,
    key: jax.Array | None = None,
    targets: Sequence[Any] | None = None,
    labels: Sequence[Mapping[str, Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **overrides: Any,
):
    """Fits merge coefficients of `adapters` on unlabeled `inputs`; returns the merged tree.

    Args:
      model: the ViT module the adapters were trained on.
      base: its frozen base parameters.
      adapters: n factored adapters over the same targets.
      heads: per adapter, its task head as a `Head` or a tuple (head_def, params, kind, spec).
      inputs: per adapter, images of its task (N_t, H, W, C), preprocessed as for evaluation;
        from the training split, never the split that will be scored. N_t >= batch_size.
      settings: a `Settings` (default: its defaults); `**overrides` replace its fields
        (`objective="entropy"`, `steps=100`, ...).
      key: a jax.random key for the minibatches (default key(0)).
      targets: output_match's per-task targets, aligned with `inputs` (`single_outputs`);
        computed here when None.
      labels: supervised only: per task, {target name: (N_t, ...) labels} aligned with inputs.
      mesh: a ('data',) mesh to split each minibatch over (multi-device CPU); None = one device.

    Returns:
      (merged tree for `lora.fold_into_base`, coefficients (see
       `coefficients.init_coefficients`), objective history (steps,) as numpy).

    Raises:
      ValueError: for a bad setting, mismatched lengths, or entropy with a non-classification
        head.
    """
    settings = _settings(settings, overrides)
    adapters = lora.on_common_targets(adapters)
    static, args = _setup(model, base, adapters, heads, inputs, settings, targets, labels, mesh)
    key = jax.random.key(0) if key is None else key
    coefficients, history = _fit(static, *args, key)
    tree = co.merged_tree(
        coefficients, args[1], static.paths, settings.granularity, settings.base_merge
    )
    dtype = lora.target_items(adapters[0])[0][1]["lora_a"].dtype
    tree = jax.tree.map(lambda x: x.astype(dtype), tree)
    return tree, jax.device_get(coefficients), np.asarray(history)


def objective_function(
    model, base, adapters, heads, inputs, settings: Settings | None = None, **overrides
):
    """(f, coefficients at init): `f(coefficients)` is `learn_merge`'s objective for these
    settings over *all* of `inputs` at once, for checks and plots. `targets`, `labels` and
    `mesh` may be passed as keywords, as to `learn_merge`."""
    extra = {k: overrides.pop(k, None) for k in ("targets", "labels", "mesh")}
    settings = _settings(settings, overrides)
    static, args = _setup(model, base, adapters, heads, inputs, settings, **extra)
    coefficients, parts, base, head_params, inputs, targets, scales = args

    def f(c):
        return _objective(static, c, parts, base, head_params, inputs, targets, scales)

    return f, coefficients
