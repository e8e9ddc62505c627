"""model.json checked against the arrays it describes, on load.

model.json is checksummed with the checkpoint, but a file edited and re-checksummed (a head
kind, a task added or dropped, a class count) would otherwise predict nonsense or raise a
KeyError deep in the forward pass. Each check names the model.json field that disagrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import heads, models

Tree = Any


def _shapes(tree: Tree) -> dict[str, tuple[int, ...]]:
    """{"a/b/kernel": shape} of every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }


def first_difference(expected: Tree, actual: Tree) -> tuple[str, str] | None:
    """(path, how) where the leaf shapes of `actual` first differ from `expected`'s, or None."""
    want, got = _shapes(expected), _shapes(actual)
    for path in sorted(set(want) | set(got)):
        if path not in got:
            return path, f"the checkpoint has no {path} (the description needs {want[path]})"
        if path not in want:
            return path, f"the checkpoint holds {path} {got[path]}, the description has none"
        if want[path] != got[path]:
            return path, f"the checkpoint's {path} is {got[path]}, the description {want[path]}"
    return None


# A head layer whose shape a task field sets (MLP heads): the field to name when it differs.
_HEAD_FIELDS = {"out": "outputs", "hidden": "head.hidden"}


def _refuse(file: str, field: str, why: str) -> ValueError:
    return ValueError(
        f"{file}: {field}: {why}; the file does not describe its checkpoint (edited?): write "
        f"the model again with `python -m jaxmerge merge`"
    )


def check_task_records(file: str, tasks: Any, head_params: Mapping[str, Tree]) -> None:
    """Each task's kind, output count, labels and metric agree with each other and with the
    checkpoint's heads (the same task names)."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise _refuse(file, "tasks", f"got {type(tasks).__name__}; allowed: one entry per head")
    if set(tasks) != set(head_params):
        raise _refuse(
            file,
            "tasks",
            f"lists {sorted(tasks)}, the checkpoint holds heads {sorted(head_params)}",
        )
    for name, task in tasks.items():
        field = f"tasks.{name}"
        kind = task.get("kind")
        if kind not in heads.HEAD_KINDS:
            raise _refuse(
                file, f"{field}.kind", f"got {kind!r}; allowed: {sorted(heads.HEAD_KINDS)}"
            )
        head_kind = heads.HEAD_KINDS[kind]
        outputs = task.get("outputs")
        if not isinstance(outputs, int) or not head_kind.outputs_allowed(outputs):
            why = f"got {outputs!r} for kind {kind!r}; allowed: {head_kind.outputs_rule}"
            raise _refuse(file, f"{field}.outputs", why)
        record = task.get("head", task)
        if record.get("outputs") != outputs:
            why = f"{record.get('outputs')!r}, but {field}.outputs is {outputs}"
            raise _refuse(file, f"{field}.head.outputs", why)
        metric = task.get("metric")
        if metric is not None and metric != head_kind.main_metric:
            why = f"{kind!r} is scored by {head_kind.main_metric!r}, the task records {metric!r}"
            raise _refuse(file, f"{field}.kind", why)
        labels = task.get("labels")
        if labels is not None and len(labels) != outputs:
            raise _refuse(file, f"{field}.labels", f"{len(labels)} names for {outputs} outputs")
        spec = task.get("spec") or {}
        missing = [k for k in head_kind.spec_keys if k not in spec]
        if missing:
            raise _refuse(file, f"{field}.spec", f"kind {kind!r} needs {missing}")


def check_against_arrays(file: str, info: Mapping[str, Any], params: Mapping[str, Tree]):
    """Raises ValueError naming the model.json field that disagrees with the checkpoint's
    arrays `params` ({"base", "heads", ["merged"]}): the folded flag, then
    `check_model_and_heads`. Returns (model_def, head_defs)."""
    if bool(info.get("folded")) != ("merged" not in params):
        has = "no merged adapter" if "merged" not in params else "a merged adapter"
        raise _refuse(file, "folded", f"is {info.get('folded')!r}, the checkpoint holds {has}")
    return check_model_and_heads(file, info, params)


def check_model_and_heads(file: str, info: Mapping[str, Any], params: Mapping[str, Tree]):
    """Raises ValueError naming the model.json field that disagrees with `params["base"]` and
    `params["heads"]`: the tasks and heads (`check_task_records`), the backbone's shapes for
    `model.kwargs` and each head's shapes for its record (an MLP's `hidden` and `outputs`).
    Returns (model_def, head_defs)."""
    check_task_records(file, info.get("tasks"), params["heads"])
    model = info.get("model") or {}
    try:
        family = models.get(model.get("family"))
        model_def = family.module(**model["kwargs"], dtype=jnp.dtype(model["dtype"]))
        expected = jax.eval_shape(lambda: family.init_params(model_def, jax.random.key(0)))
    except (KeyError, TypeError, ValueError) as error:
        raise _refuse(file, "model", f"does not build a model ({error})") from None
    difference = first_difference(expected, params["base"])
    if difference:
        raise _refuse(file, "model.kwargs", difference[1])
    size, channels = model_def.image_size, model_def.channels
    image = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    pooled = jax.eval_shape(
        lambda p, x: model_def.apply({"params": p}, x)["pooled"], expected, image
    )
    feature = jax.ShapeDtypeStruct((1, pooled.shape[-1]), jnp.float32)
    head_defs = {}
    for name, task in info["tasks"].items():
        # Folders written before head records held "hidden" and "outputs" only: MLP heads.
        record = task.get("head", task)
        try:
            head_def = heads.from_record(record)
        except (KeyError, TypeError, ValueError) as error:
            raise _refuse(file, f"tasks.{name}.head", f"does not build a head ({error})") from None
        want = jax.eval_shape(lambda x, h=head_def: h.init(jax.random.key(0), x)["params"], feature)
        difference = first_difference(want, params["heads"][name])
        if difference:
            field = _HEAD_FIELDS.get(difference[0].split("/")[0], "head")
            raise _refuse(file, f"tasks.{name}.{field}", difference[1])
        head_defs[name] = head_def
    return model_def, head_defs
