"""A new task from old adapters: with the new task's labels, learn only the gates over a frozen
stack of existing adapters and a new head (AdapterFusion's and ScaLearn's setting).

The composed model is the fused backbone of `jaxmerge.fusion` under a head of its own,

    h_l = x W_l + bias_l + sum_t g_{l,t} s_t (x a_{l,t}) b_{l,t},     outputs = head(pooled),

base and adapters frozen. Trained are the static gates g (one per adapted layer l and adapter
t: L x n numbers) and the head, by the new task's own loss, the one `train` uses
(`heads.HEAD_KINDS[task.kind].loss`), on labelled examples (x, y):

    min_{g, head}  mean_{(x, y) in batch}  loss(head(f(x; g)), y).

With g = 0 the model is the head on the bare base (head finetuning); the gates start at
`Settings.gate_init`. Unlike `fusion.learn_gates` (label-free, each task keeps its own head)
nothing here matches an adapter's outputs: the adapters are only features to reuse.

    picks = compose.per_class(labels, 10, seed=0)            # a k-shot draw
    gates, head, record = compose.learn_composition(
        model, base, stacked, head_def, task, images[picks], labels[picks], compose.Settings())
    tree = compose.composed_tree(stacked, gates)  # scoring.Scorer(...)(base, head, tree)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import adapter_stack, fusion, heads, lora
from jaxmerge.learned.adam import adam_scan

Tree = Any
F32 = jnp.float32
GATES = ("adapter", "rank")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the gates and the head are fitted (the static argument of the jitted fit).

    Attributes:
      steps, batch_size: Adam steps, each on `batch_size` examples drawn with replacement.
      learning_rate: the head's Adam step size; gate_learning_rate: the gates' (a gate is one
        number of order 1 scaling a whole adapter, a head weight of order 1/sqrt(width)).
      gate_init: every gate's start (0: head finetuning on the base; 1: every adapter added).
      cosine: decay both step sizes to 0 along a cosine over the steps.
      gates: "adapter", one gate per adapted layer and adapter, or "rank", one per layer and
        rank column of every adapter (r_t times as many, each direction of an adapter scaled
        on its own).
    """

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-3
    gate_learning_rate: float = 0.02
    gate_init: float = 0.0
    cosine: bool = True
    gates: str = "adapter"

    def __post_init__(self):
        for field in ("steps", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Settings.{field}: got {value!r}; allowed: an integer >= 1")
        for field in ("learning_rate", "gate_learning_rate"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Settings.{field}: got {value!r}; allowed: a finite number > 0")
        if self.gates not in GATES:
            raise ValueError(f"Settings.gates: got {self.gates!r}; allowed: one of {list(GATES)}")
        init = self.gate_init
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"Settings.gate_init: got {init!r}; allowed: a finite number")


def per_class(labels, count: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `count` examples of every class in `labels` (0: all of them), drawn
    without replacement with `numpy.random.default_rng(seed)` (a k-shot draw).

    Raises:
      ValueError: `count` not an integer >= 0, or a class with fewer than `count` examples.
    """
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
        raise ValueError(f"examples per class: got {count!r}; allowed: an integer >= 0 (0: all)")
    labels = np.asarray(labels)
    if count == 0:
        return np.arange(len(labels))
    rng, picks = np.random.default_rng(seed), []
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        if len(where) < count:
            raise ValueError(
                f"examples per class: got {count}, but class {label} has {len(where)}; "
                f"allowed: at most {len(where)}, or 0 for all"
            )
        picks.append(rng.choice(where, count, replace=False))
    return np.sort(np.concatenate(picks))


def parameter_count(tree: Tree) -> int:
    """The number of numbers in a tree's leaves."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def init_gates(stacked: Tree, gates: str, value: float) -> Tree:
    """{target path: (n,)} per adapter or {target path: (R,)} per rank column, all `value`."""
    if gates == "adapter":
        return fusion.init_gates(stacked, "static", value)
    return {
        p: jnp.full(n["gate_expand"].shape[1:], value, F32) for p, n in lora.target_items(stacked)
    }


def _per_rank(stacked: Tree, gates: Tree) -> bool:
    # Told apart by shape: (n,) per adapter, (R,) per rank column; where R == n every adapter
    # has rank 1 and the two readings are the same.
    first = lora.target_items(stacked)[0][0]
    return jnp.shape(gates[first]) != (adapter_stack.size(stacked),)


def composed_tree(stacked: Tree, gates: Tree) -> Tree:
    """The 'lora' tree of the composed backbone for gates per adapter or per rank column."""
    if _per_rank(stacked, gates):
        return adapter_stack.with_rank_gates(stacked, gates)
    return fusion.fused_tree(stacked, gates, "static")


def gates_per_adapter(stacked: Tree, gates: Tree) -> np.ndarray:
    """(targets, adapters): each adapter's gate, or the mean of its rank columns' gates."""
    rows = []
    for path, node in lora.target_items(stacked):
        gate = np.asarray(gates[path])
        if _per_rank(stacked, gates):
            expand = np.asarray(node["gate_expand"])
            gate = expand @ gate / expand.sum(1)
        rows.append(gate)
    return np.stack(rows)


def composed_outputs(model, head_def, base: Tree, stacked: Tree, params: Tree, images):
    """head(pooled(images; base + sum_t g_{l,t} adapter_t)) for params {"gates", "head"}."""
    tree = composed_tree(stacked, params["gates"])
    pooled = model.apply({"params": base, "lora": tree}, images)["pooled"]
    return head_def.apply({"params": params["head"]}, pooled)


def composed_loss(model, head_def, kind: str, spec: dict, base, stacked, params, images, labels):
    """mean_b loss(composed_outputs(x_b), y_b): the head kind's training loss (`heads`), with
    `spec` the task's `loss_spec` (its target's name and the kind's settings)."""
    outputs = composed_outputs(model, head_def, base, stacked, params, images)
    batch = {spec["target"]: labels}
    return heads.head_kind(kind).loss(outputs, batch, spec).mean()


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _fit(
    model, head_def, kind, spec, settings: Settings, params, base, stacked, images, labels, key
):
    count, spec = images.shape[0], dict(spec)

    def loss(params, step_key):
        # With replacement: a 10-shot task can have fewer examples than a batch.
        index = jax.random.randint(step_key, (settings.batch_size,), 0, count)
        return composed_loss(
            model, head_def, kind, spec, base, stacked, params, images[index], labels[index]
        )

    rates = {"gates": settings.gate_learning_rate, "head": settings.learning_rate}
    return adam_scan(loss, params, key, settings.steps, rates, settings.cosine)


def check_on_base(stacked: Tree, base: Tree) -> None:
    """Raises ValueError unless every target of `stacked` is a dense layer of `base` of the
    adapter's (in, out) shape (adapters trained on another base or model fail here)."""
    for path, node in lora.target_items(stacked):
        shape = (node["lora_a"].shape[0], node["lora_b"].shape[1])
        try:
            kernel = lora.get_at(base, path)["kernel"].shape
        except (KeyError, TypeError):
            kernel = None
        if kernel != shape:
            raise ValueError(
                f"stacked[{path!r}]: adapters of shape {shape} but the base's layer is "
                f"{kernel or 'missing'}; allowed: adapters trained on this base"
            )


def learn_composition(
    model,
    base: Tree,
    stacked: Tree,
    head_def,
    task,
    images,
    labels,
    settings: Settings = Settings(),
    key: jax.Array | None = None,
) -> tuple[Tree, Tree, dict[str, Any]]:
    """Fits static gates over the frozen `stacked` adapters and a new head by `task`'s loss.

    Args:
      model, base: the model definition and the frozen base parameters.
      stacked: the old adapters' stack (`adapter_stack.stack`, `fuse.stack_runs`).
      head_def: the new head's module (e.g. `heads.MlpHead(hidden, task.outputs)`), initialised
        here from `key`.
      task: the new task (`tasks.Task`): its head kind's loss and its target's name.
      images, labels: (N, H, W, C) training images as `runs.examples` reads them, and (N, ...)
        their targets.
      key: the head's initialisation and the batches drawn (default `jax.random.key(0)`).

    Returns:
      (gates {target path: (n,)}, head params, record): the settings, the examples, the loss
      [first, last] step, the seconds (compile included) and the parameters trained (gates:
      targets x adapters, head, total).
    """
    adapter_stack.check_stack(stacked, "stacked")
    check_on_base(stacked, base)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"images, labels: got shapes {images.shape} and {labels.shape}; allowed: (N, H, W, C) "
            "images and N labels, N >= 1"
        )
    outputs = getattr(head_def, "outputs", task.outputs)
    if outputs != task.outputs:
        raise ValueError(
            f"head_def.outputs: got {outputs}; allowed: task {task.name!r}'s {task.outputs}"
        )
    if task.kind == "classification" and (labels.min() < 0 or labels.max() >= task.outputs):
        raise ValueError(
            f"labels: got values in [{labels.min()}, {labels.max()}]; allowed: classes 0 to "
            f"{task.outputs - 1} of task {task.name!r}"
        )
    key = jax.random.key(0) if key is None else key
    head_key, fit_key = jax.random.split(key)
    width = model.apply({"params": base}, images[:1])["pooled"].shape[-1]
    params = {
        "gates": init_gates(stacked, settings.gates, float(settings.gate_init)),
        "head": head_def.init(head_key, jnp.zeros((1, width), F32))["params"],
    }
    start = time.perf_counter()
    spec = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in task.loss_spec.items())
    )
    params, history = _fit(
        model, head_def, task.kind, spec, settings, params, base, stacked, images, labels, fit_key
    )
    params, history = jax.device_get((params, history))
    record = {
        "settings": dataclasses.asdict(settings),
        "examples": int(len(images)),
        "loss": [float(history[0]), float(history[-1])],
        "seconds": round(time.perf_counter() - start, 3),
        "parameters": {
            "gates": parameter_count(params["gates"]),
            "head": parameter_count(params["head"]),
            "total": parameter_count(params),
        },
        "adapters": adapter_stack.size(stacked),
    }
    return params["gates"], params["head"], record
