"""Mixed-adapter batches: requests of several tasks served by one forward pass.

Each example names its task (or None for the bare base); the base's matmuls run once for the
whole batch and each example adds its own adapter's low-rank branch (PEFT's `adapter_names`),
then its own task's head reads the pooled feature:

    server = mixed_batch.make_server(model, base, {"digits": adapter_1, "textures": adapter_2},
                                     {"digits": (head_def_1, head_1), "textures": (...)})
    outputs = server.serve(images, ["digits", "textures", None, "digits"])
    # outputs[0]: (10,) digits logits, outputs[1]: (5,) textures logits, outputs[2]: the
    # pooled feature (D,) of the base alone

    server = mixed_batch.from_runs(["W/seed_0/adapters/digits", "W/seed_0/adapters/textures"])

The adapters live in one `adapter_stack`; an example's gate is the one-hot row of its adapter,
so the batch costs one base forward plus a branch of width sum_t r_t at every target.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxmerge import adapter_stack, lora
from jaxmerge import runs as runs_lib

Tree = Any
BASE_NAMES = (None, "__base__")  # PEFT's name for "no adapter" is accepted beside None


def adapter_index(names: Sequence[str | None], known: Sequence[str]) -> np.ndarray:
    """(B,) int32 index into `known` of each example's adapter name, -1 for the base.

    Raises:
      ValueError: naming the first example whose adapter is not in `known` (before any
        compute).
    """
    position = {name: i for i, name in enumerate(known)}
    index = np.empty((len(names),), np.int32)
    for i, name in enumerate(names):
        if name in BASE_NAMES:
            index[i] = -1
        elif isinstance(name, str) and name in position:
            index[i] = position[name]
        else:
            raise ValueError(
                f"adapter_names[{i}]: got {name!r}; allowed: one of {list(known)}, or None / "
                "'__base__' for the base alone"
            )
    return index


def mixed_forward(model, base: Tree, stacked: Tree, index: jax.Array, images: jax.Array):
    """`model`'s outputs on `images` (B, ...) with example b adapted by adapter `index[b]` of
    the stack alone (-1: the base), in one forward pass."""
    tree = adapter_stack.with_index(stacked, index)
    return model.apply({"params": base, "lora": tree}, images)


_mixed_forward = jax.jit(mixed_forward, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward_with_heads(model, head_defs, base, stacked, head_params, index, images):
    pooled = mixed_forward(model, base, stacked, index, images)["pooled"]
    # Every head on every example: the heads are tiny beside the backbone, and one program
    # serves every mixture of requests of a batch size.
    outputs = tuple(h.apply({"params": p}, pooled) for h, p in zip(head_defs, head_params))
    return pooled, outputs


@dataclasses.dataclass(frozen=True)
class Server:
    """Serves batches of requests for the tasks in `names` (see `make_server`)."""

    model: Any
    base: Tree
    names: tuple[str, ...]
    stacked: Tree
    head_defs: tuple | None
    head_params: tuple | None

    def index(self, names: Sequence[str | None]) -> np.ndarray:
        return adapter_index(names, self.names)

    def forward(self, images, names: Sequence[str | None]):
        """(pooled (B, D), {task: (B, outputs_task)} of every head on every example; {} without
        heads): the raw batch outputs, for callers that gather themselves."""
        index = self._checked(images, names)
        if self.head_defs is None:
            out = _mixed_forward(self.model, self.base, self.stacked, index, images)
            return out["pooled"], {}
        pooled, outputs = _forward_with_heads(
            self.model, self.head_defs, self.base, self.stacked, self.head_params, index, images
        )
        return pooled, dict(zip(self.names, outputs))

    def serve(self, images, names: Sequence[str | None]) -> list[np.ndarray]:
        """Per example: its task's head outputs, or its pooled feature when its name is None
        (or when the server has no heads)."""
        pooled, outputs = jax.device_get(self.forward(images, names))
        return [
            pooled[i] if name in BASE_NAMES or not outputs else outputs[name][i]
            for i, name in enumerate(names)
        ]

    def _checked(self, images, names) -> np.ndarray:
        index = self.index(names)
        if np.ndim(images) < 1 or len(images) != len(index):
            raise ValueError(
                f"adapter_names: got {len(index)} names for {np.shape(images)[:1]} images; "
                "allowed: one name per image"
            )
        return index


def make_server(
    model,
    base: Tree,
    adapters: Mapping[str, Tree],
    heads: Mapping[str, tuple[Any, Tree]] | None = None,
) -> Server:
    """A `Server` for the named adapters (and their heads) on `base`.

    Args:
      model: the model definition the adapters were trained on.
      base: its base parameters (checked against every adapter's shapes here).
      adapters: {task: factored adapter}.
      heads: {task: (head module, head parameters)}, the same tasks, or None to serve pooled
        features.

    Raises:
      ValueError: for an adapter that does not fit `base`, or heads for other tasks.
    """
    names = tuple(adapters)
    for name in names:
        lora.check_against_base(adapters[name], base, name=f"adapters[{name!r}]")
        lora.check_finite(adapters[name], name=f"adapters[{name!r}]")
    if heads is not None and set(heads) != set(names):
        raise ValueError(
            f"heads: got tasks {sorted(heads)}; allowed: exactly the adapters' {sorted(names)}"
        )
    stacked = adapter_stack.stack([adapters[n] for n in names], [f"adapters[{n!r}]" for n in names])
    head_defs = None if heads is None else tuple(heads[n][0] for n in names)
    head_params = None if heads is None else tuple(heads[n][1] for n in names)
    return Server(model, base, names, stacked, head_defs, head_params)


def from_runs(directories: Sequence[str], load_run: Callable | None = None) -> Server:
    """A `Server` for trained runs (`WORKDIR/adapters/<task>`), each task by its name.

    Raises:
      ValueError: for runs on different bases or model settings, runs of one task twice, or a
        run without an adapter.
    """

    runs = [(load_run or runs_lib.load)(d) for d in directories]
    for run in runs:
        if run.adapter is None:
            raise ValueError(f"runs: {run.directory!r} has no adapter; allowed: LoRA runs")
        if run.config.model.to_dict() != runs[0].config.model.to_dict():
            raise ValueError(
                f"runs: {run.directory!r} has model settings {run.config.model.to_dict()}, "
                f"{runs[0].directory!r} has {runs[0].config.model.to_dict()}; allowed: runs of "
                "one model"
            )
    names = [run.task.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: tasks {names} repeat; allowed: one run per task")
    model, base = runs_lib.base_of(runs)
    return make_server(
        model,
        base,
        {r.task.name: r.adapter for r in runs},
        {r.task.name: (r.head_def, r.head) for r in runs},
    )
