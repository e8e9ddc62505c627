"""RegMean and RegMean++ as recipes: the closed-form merge of every adapted layer
(`merging.regmean`) from the Gram matrices of its inputs on a few unlabeled images of each task's
training split (`runs.examples`, the images the learned merges read). No gradient step.

    merged, record = recipes.merge_runs(runs, model, base, "regmean")
    merged, record = recipes.merge_runs(runs, model, base, "regmean_plusplus", None, {"images": 64})

regmean (Jin et al. 2023): task i's Grams are taken on task i's own model (base + its adapter),
as FusionBench's RegMean hooks each fine-tuned model.
regmean_plusplus (Nguyen et al. 2025, "RegMean++"): layer by layer, in forward order; the Grams
of block l are taken with blocks < l already merged and block l (and later) task i's own,
as FusionBench's RegMean++ feeds each task's merged stream into its own block l. A target
outside the blocks (a patch embedding) is a stage of its own.

Settings: `images` per task (FusionBench's num_regmean_examples, 256), the off-diagonal factor
`reduce_non_diagonal_ratio` (FusionBench's CLIP default 0.95) and `batch_size` (memory only).
The result is a delta tree (`{"delta": dW}` per adapted layer) for `lora.fold_into_base`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxmerge import layer_inputs, lora
from jaxmerge.merging import regmean as regmean_math
from jaxmerge.merging import targets as mt
from jaxmerge.recipes import learned, registry

SETTINGS = {"images": 256, "reduce_non_diagonal_ratio": 0.95, "batch_size": 64}
_BLOCK = re.compile(r"(.*?block_\d+)(/|$)")


def check_settings(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The full settings of recipe `name` with `params` overriding the defaults, checked."""
    unknown = sorted(set(params) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"params: {name!r} got unknown parameter(s) {unknown}; allowed: {sorted(SETTINGS)}"
        )
    settings = {**SETTINGS, **params}
    for field in ("images", "batch_size"):
        value = settings[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    ratio = settings["reduce_non_diagonal_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reduce_non_diagonal_ratio: got {ratio!r}; allowed: a number in [0, 1]")
    return settings


def _stage(path: str) -> str:
    """The unit RegMean++ merges at once: the block holding `path`, else the layer itself."""
    match = _BLOCK.match(path)
    return match.group(1) if match else path


class _Problem:
    """What both recipes share: the targets in forward order, every task's deltas, images."""

    def __init__(self, runs, model_def, base, settings, seed, cache):
        self.model_def, self.base, self.cache, self.seed = model_def, base, cache, seed
        self.runs, self.settings = runs, settings
        adapters = lora.on_common_targets([run.adapter for run in runs])
        self.deltas = [
            {path: lora.delta_of(node).astype(jnp.float32) for path, node in lora.target_items(a)}
            for a in adapters
        ]
        self.dtypes = {p: lora.delta_of(n).dtype for p, n in lora.target_items(adapters[0])}
        count = settings["images"]
        self.images = [x for x, _ in learned.task_examples(runs, model_def, count, seed, cache)]
        for run, images in zip(runs, self.images):
            if len(images) == 0:
                raise ValueError(f"images: run {run.directory!r} has no training images to read")
        order = layer_inputs.forward_order(
            model_def, base, self.delta_tree(self.deltas[0]), self.images[0].shape
        )
        self.paths = tuple(p for p in order if p in self.deltas[0])

    def delta_tree(self, deltas: Mapping[str, Any]):
        return mt.tree(list(deltas), [{"delta": d} for d in deltas.values()])

    def grams(self, task: int, deltas: Mapping[str, Any]):
        """Task `task`'s Grams at every target with `deltas` applied."""
        return layer_inputs.input_grams(
            self.model_def,
            self.base,
            self.delta_tree(deltas),
            self.images[task],
            self.paths,
            self.settings["batch_size"],
        )

    def own_grams(self, task: int):
        """Task `task`'s Grams on its own model, cached per run (reused by every merge)."""
        run, s = self.runs[task], self.settings
        key = ("regmean_grams", run.directory, s["images"], self.seed, self.paths)
        if key not in self.cache:
            self.cache[key] = self.grams(task, self.deltas[task])
        return self.cache[key]

    def solve(self, grams, paths):
        return regmean_math.regmean_deltas(
            [{p: g[p] for p in paths} for g in grams],
            [{p: d[p] for p in paths} for d in self.deltas],
            self.settings["reduce_non_diagonal_ratio"],
        )

    def result(self, name: str, merged):
        tree = mt.tree(
            list(self.paths), [{"delta": merged[p].astype(self.dtypes[p])} for p in self.paths]
        )
        record = {
            "method": name,
            "settings": dict(self.settings),
            "split": sorted({run.task.train_split for run in self.runs}),
            "images_per_task": self.settings["images"],
            "labeled_per_task": 0,
        }
        return tree, record


@registry.register(
    "regmean",
    reads="unlabeled",
    check=lambda params: check_settings("regmean", params),
    about="RegMean: per adapted layer, (sum_i G_i)^-1 sum_i G_i dW_i from each task's Gram "
    "of the layer's inputs on its own model",
)
def regmean(runs, model_def, base, weights, settings, seed, cache):
    del weights
    problem = _Problem(runs, model_def, base, settings, seed, cache)
    grams = [problem.own_grams(i) for i in range(len(runs))]
    return problem.result("regmean", problem.solve(grams, problem.paths))


@registry.register(
    "regmean_plusplus",
    reads="unlabeled",
    check=lambda params: check_settings("regmean_plusplus", params),
    about="RegMean++: RegMean block by block, each block's Grams taken with the earlier "
    "blocks already merged",
)
def regmean_plusplus(runs, model_def, base, weights, settings, seed, cache):
    del weights
    problem = _Problem(runs, model_def, base, settings, seed, cache)
    stages: dict[str, list[str]] = {}
    for path in problem.paths:
        stages.setdefault(_stage(path), []).append(path)
    merged: dict[str, Any] = {}
    for index, paths in enumerate(stages.values()):
        if index == 0:  # nothing merged yet: each task's own model, as RegMean
            grams = [problem.own_grams(i) for i in range(len(runs))]
        else:
            grams = [problem.grams(i, {**d, **merged}) for i, d in enumerate(problem.deltas)]
        merged.update(problem.solve(grams, paths))
    return problem.result("regmean_plusplus", merged)
