"""The fused model folder (`python -m jaxmerge merge --fuse static|router|mixture`): every task's
adapter kept apart on the one base, with the gates that mix them (`jaxmerge.fusion`).

Where a merged folder holds one merged adapter, a fused one holds

  model.json    as a merged folder's (model, tasks, preprocessing, base fingerprint), with
                format `jaxmerge.fused_model/1` and, instead of "merge" and "folded", "fusion":
                the gating, its settings, the objective, the seconds of the fit, the tasks in
                the order of the gates' columns and each source run with SHA-256 checksums of
                its adapter and head;
  checkpoints/0 {"base", "adapters": {task: adapter}, "gates", "heads": {task: head}}, the
                gates nested by target path like an adapter: static, one (n,) vector per
                target; router, {"kernel": (in, n), "bias": (n,)} per target; mixture, those and
                {"table": (n, R)}.

Loaded (`model_folder.load`), it is a `MultiTaskModel` whose `lora` is the gated stack
(`fusion.fused_tree`): every forward runs the base with every adapter under its gates, once,
and feeds every head, h = x W + b + sum_t g_t(x) s_t (x a_t) b_t at each adapted layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxmerge import adapter_stack, fusion, lora
from jaxmerge.model_folder import checks
from jaxmerge.model_folder.describe import describe
from jaxmerge.model_folder.model import MultiTaskModel, assemble

Tree = Any
FORMAT = "jaxmerge.fused_model/1"
ARRAYS = ("adapters", "base", "gates", "heads")


def describe_fused(runs, model_def, record: Mapping[str, Any]) -> dict[str, Any]:
    """model.json's content for `runs` fused as `record` says (gating, settings, objective,
    seconds: `jaxmerge.fuse.fuse_runs`)."""
    info = describe(runs, model_def, {}, fold=False)
    sources = info.pop("merge")["runs"]
    del info["folded"]
    tasks = [run.task.name for run in runs]
    return {**info, "format": FORMAT, "fusion": {**record, "tasks": tasks, "runs": sources}}


def nest_gates(gates: Mapping[str, Any]) -> Tree:
    """{target path: gate} -> the gates nested by path, as an adapter's targets are."""
    tree: Tree = {}
    for path, gate in gates.items():
        tree = lora.set_at(tree, path, gate)
    return tree


def flat_gates(tree: Tree, gating: str, prefix: str = "") -> dict[str, Any]:
    """The inverse of `nest_gates`: a static gate is an array, a router a {"kernel", "bias"}
    (and a mixture's "table")."""
    is_gate = ("kernel" in tree) if gating in fusion.ROUTERS else not isinstance(tree, Mapping)
    if is_gate or not isinstance(tree, Mapping):
        return {prefix: tree}
    flat = {}
    for name in sorted(tree):
        flat.update(flat_gates(tree[name], gating, f"{prefix}/{name}" if prefix else name))
    return flat


def stack_in_order(adapters: Mapping[str, Tree], order: Sequence[str], name: str) -> Tree:
    """The stack (`adapter_stack.stack`) of the tasks' adapters, adapter t the t-th of `order`
    (the gates' columns)."""
    return adapter_stack.stack(
        [adapters[task] for task in order], [f"{name}[{task!r}]" for task in order]
    )


def arrays(info, base: Tree, adapters: Mapping[str, Tree], gates, head_params) -> dict:
    """The checkpoint's tree for a fused folder, its gates checked against its adapters (the
    order of model.json's fusion.tasks) before anything is written."""
    fused = info["fusion"]
    stacked = stack_in_order(adapters, fused["tasks"], "adapters")
    fusion.check_gates(stacked, gates, fused["gating"])
    return {
        "base": base,
        "adapters": {task: adapters[task] for task in fused["tasks"]},
        "gates": nest_gates(gates),
        "heads": dict(head_params),
    }


def _refuse(file: str, field: str, why: str) -> ValueError:
    return ValueError(
        f"{file}: {field}: {why}; the folder does not describe its arrays (edited?): write the "
        f"model again with `python -m jaxmerge merge --fuse`"
    )


def from_arrays(file: str, info: Mapping[str, Any], params: Mapping[str, Tree]) -> MultiTaskModel:
    """The fused model of `info` (model.json) over its checkpoint's verified arrays `params`.

    Raises:
      ValueError: naming the field that disagrees: model.json against the base and heads
        (`checks.check_model_and_heads`), the gating, the adapters' tasks and shapes, the
        gates' targets, count and shapes against the adapters (`fusion.check_gates`).
    """
    if sorted(params) != sorted(ARRAYS):
        raise _refuse(file, "checkpoint", f"holds {sorted(params)}; allowed: {list(ARRAYS)}")
    model_def, head_defs = checks.check_model_and_heads(file, info, params)
    fused = info.get("fusion") or {}
    gating, order = fused.get("gating"), fused.get("tasks")
    if gating not in fusion.GATINGS:
        raise _refuse(file, "fusion.gating", f"got {gating!r}; allowed: {list(fusion.GATINGS)}")
    adapters = params["adapters"]
    if not isinstance(order, list) or sorted(order) != sorted(info["tasks"]):
        raise _refuse(file, "fusion.tasks", f"got {order!r}; allowed: {list(info['tasks'])}")
    if sorted(adapters) != sorted(order):
        raise _refuse(file, "adapters", f"the checkpoint holds {sorted(adapters)}, for {order}")
    for task in order:
        lora.check_against_base(adapters[task], params["base"], f"{file}: adapters[{task!r}]")
    stacked = stack_in_order(adapters, order, f"{file}: adapters")
    gates = flat_gates(params["gates"], gating)
    fusion.check_gates(stacked, gates, gating, f"{file}: gates")
    tree = fusion.fused_tree(stacked, gates, gating)
    return assemble(model_def, params["base"], params["heads"], info, None, head_defs, tree)
