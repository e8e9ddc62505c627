"""Learned merges of trained runs by name: the presets, and the images they adapt on.

    runs = [evaluate.load_run(d) for d in ("W/adapters/digits", "W/adapters/textures")]
    model, base = evaluate.load_base_of(runs)
    merged, record = learned_runs.merge_runs(runs, model, base, "learned_output_match")
    backbone = lora.fold_into_base(base, merged)

A preset is a named setting of `merging.learned.learn_merge`; `jaxmerge.evaluate --merge NAME`
and the study take these names beside the fixed methods of `merging.METHODS`. Adaptation images
come from each task's *training* split (`Task.train_split`), preprocessed as for evaluation,
never from the split that is scored. Label-free presets read no labels; "learned_supervised"
reads `labeled` labeled examples per task and is reported as supervised.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxmerge import data
from jaxmerge.merging import learned

Tree = Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named learned merge: `learn_merge` keywords, and whether it reads labels."""

    settings: Mapping[str, Any]
    supervised: bool
    about: str


PRESETS: dict[str, Preset] = {
    "learned_output_match": Preset(
        dict(objective="output_match", granularity="core"),
        False,
        "label-free: each head's outputs on the merged backbone matched to its single "
        "adapter's; a full mixing matrix of the stacked factors per layer",
    ),
    "learned_output_match_layer": Preset(
        dict(objective="output_match", granularity="layer"),
        False,
        "label-free output matching with AdaMerging's layer-wise coefficients",
    ),
    "adamerging": Preset(
        dict(objective="entropy", granularity="layer", init=1.0, bounds=(0.0, 1.0)),
        False,
        "AdaMerging, layer-wise: prediction entropy (classification heads only)",
    ),
    "adamerging_task": Preset(
        dict(objective="entropy", granularity="task", init=0.3, bounds=(0.0, 1.0)),
        False,
        "AdaMerging, task-wise, its published initialisation 0.3 and range [0, 1]",
    ),
    "adamerging_ties": Preset(
        dict(objective="entropy", granularity="layer", base_merge="ties", init=1.0, bounds=(0, 1)),
        False,
        "AdaMerging++, layer-wise on TIES-processed task vectors (classification heads only)",
    ),
    "learned_supervised": Preset(
        dict(objective="supervised", granularity="core"),
        True,
        "supervised: each task's own loss on `labeled` labeled training examples",
    ),
}
# Data settings, not `learn_merge` keywords: unlabeled images and labeled examples per task.
DATA_SETTINGS = {"images": 256, "labeled": 64}


def adaptation_inputs(run, model_def, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` examples of the run's task from its training split (a seeded sample, sorted),
    preprocessed as for evaluation: (images (N, H, W, C) float32, labels (N, ...))."""
    task = run.task
    source = data.open_split(task, task.train_split, run.config)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(source), size=min(count, len(source)), replace=False))
    normalization = data.normalization(run.config)
    preprocess = data.preprocess(task, model_def.image_size, train=False, **normalization)
    examples = [preprocess(source[int(i)], np.random.default_rng(0)) for i in index]
    images = np.stack([e["image"] for e in examples]).astype(np.float32)
    return images, np.stack([np.asarray(e[task.target]) for e in examples])


def check_method(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The full settings of preset `name` with `params` overriding them, checked."""
    if name not in PRESETS:
        raise ValueError(f"method: got {name!r}; allowed learned methods: {sorted(PRESETS)}")
    allowed = set(DATA_SETTINGS) | set(learned.SETTINGS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"params: learned method {name!r} got unknown parameter(s) {unknown}; allowed: "
            f"{sorted(allowed)}"
        )
    settings = {**DATA_SETTINGS, **PRESETS[name].settings, **params}
    for field in DATA_SETTINGS:
        value = settings[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    return settings


def merge_runs(
    runs: Sequence[Any],
    model_def,
    base: Tree,
    method: str,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    cache: dict | None = None,
) -> tuple[Tree, dict]:
    """Learns the merge of the runs' adapters with preset `method`.

    Args:
      runs: `evaluate.Run`s with adapters, one per task.
      model_def, base: the model and base parameters they were trained on.
      method: a name in `PRESETS`; `params` override its settings (`learn_merge` keywords,
        `images`, `labeled`).
      seed: picks the adaptation images and the minibatches.
      cache: a dict reused across calls (e.g. every merge of a study seed): each task's images
        and single-adapter outputs are computed once.

    Returns:
      (merged tree for `lora.fold_into_base`, record): the record holds the method, settings,
      coefficients (JSON), seconds, the split adapted on, and images / labeled examples used
      per task; `merging.learned.rebuild` rebuilds the tree from it without relearning.
    """
    settings = check_method(method, dict(params or {}))
    images, labeled = settings.pop("images"), settings.pop("labeled")
    count = labeled if PRESETS[method].supervised else images
    cache = {} if cache is None else cache
    start = time.perf_counter()
    inputs, labels, targets = [], [], []
    for run in runs:
        key = ("inputs", run.directory, count, seed)
        if key not in cache:
            cache[key] = adaptation_inputs(run, model_def, count, seed)
        images, task_labels = cache[key]
        inputs.append(images)
        labels.append({run.task.target: task_labels})
        if settings["objective"] == "output_match":
            target_key = ("targets", run.directory, count, seed)
            if target_key not in cache:
                head = learned.Head(run.head_def, run.head, run.task.kind, run.task.loss_spec)
                cache[target_key] = learned.single_outputs(
                    model_def, base, run.adapter, head, images
                )
            targets.append(cache[target_key])
    heads = [learned.Head(r.head_def, r.head, r.task.kind, r.task.loss_spec) for r in runs]
    tree, coefficients, history = learned.learn_merge(
        model_def,
        base,
        [run.adapter for run in runs],
        heads,
        inputs,
        key=jax.random.key(seed),
        targets=targets or None,
        labels=labels if PRESETS[method].supervised else None,
        **settings,
    )
    record = {
        "method": method,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "coefficients": learned.coefficients_to_json(coefficients),
        "objective": [float(history[0]), float(history[-1])],
        "seconds": time.perf_counter() - start,
        "split": sorted({run.task.train_split for run in runs}),
        "images_per_task": 0 if PRESETS[method].supervised else count,
        "labeled_per_task": count if PRESETS[method].supervised else 0,
    }
    return tree, record
