"""Multi-task inference: one forward pass of a merged backbone feeds every task's own head.

After merging, the adapters live in one backbone (`lora.fold_into_base(base, merged)`), so all
tasks share its pooled feature: n tasks cost one ViT forward plus n small heads, instead of n
ViT forwards with one adapter each (`benchmarks/multitask_inference.py` times both).

    backbone = lora.fold_into_base(base, merge.merge(adapters, "ties", density=0.5))
    predict = multitask.make_predictor(model, {"digits": head_def_1, "textures": head_def_2})
    outputs = predict(backbone, {"digits": head_1, "textures": head_2}, images)
    # outputs["digits"]: (B, 10) logits, outputs["textures"]: (B, 5) logits
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jaxmerge import heads
from jaxmerge.models import vit

Tree = Any


def multitask_forward(
    model: vit.ViT,
    head_defs: Mapping[str, heads.MlpHead],
    backbone: Tree,
    head_params: Mapping[str, Tree],
    images: jax.Array,
    lora: Tree | None = None,
) -> dict[str, jax.Array]:
    """{task: head_task(pooled)} with `pooled = model(backbone, images)` computed once.

    Args:
      model: the ViT definition of the backbone.
      head_defs: {task: head module}; one entry per task.
      backbone: base parameters with the (merged) adapter folded in.
      head_params: {task: that head's parameters}, the same keys as `head_defs`.
      images: (B, H, W, C) preprocessed as the backbone was trained.
      lora: a 'lora' tree applied on `backbone` at every forward (a fused model's gated
        adapter stack, `jaxmerge.fusion`), or None where the adapter is folded in.

    Returns:
      {task: (B, outputs_task)} in the order of `head_defs`.
    """
    if set(head_defs) != set(head_params):
        raise ValueError(
            f"multitask_forward: head_defs has tasks {sorted(head_defs)} but head_params has "
            f"{sorted(head_params)}; give one head and its parameters per task"
        )
    variables = {"params": backbone} if lora is None else {"params": backbone, "lora": lora}
    pooled = model.apply(variables, images)["pooled"]
    return {
        task: head_def.apply({"params": head_params[task]}, pooled)
        for task, head_def in head_defs.items()
    }


def make_predictor(model: vit.ViT, head_defs: Mapping[str, heads.MlpHead]):
    """A jitted `predict(backbone, head_params, images, lora=None) -> {task: outputs}` (one
    forward; `lora` as in `multitask_forward`)."""
    head_defs = dict(head_defs)

    def predict(backbone, head_params, images, lora=None):
        return multitask_forward(model, head_defs, backbone, head_params, images, lora)

    return jax.jit(predict)


def make_single_task_predictor(model: vit.ViT, head_def: heads.MlpHead):
    """A jitted `predict(backbone, head_params, images) -> outputs` for one task (the baseline
    of running each adapter separately: one forward per task)."""

    def predict(backbone, head_params, images):
        pooled = model.apply({"params": backbone}, images)["pooled"]
        return head_def.apply({"params": head_params}, pooled)

    return jax.jit(predict)
