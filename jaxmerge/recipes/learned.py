"""Learned merges as recipes: named settings of `merging.learned.learn_merge`, fitted on a few
images of each task's training split (`runs.examples`, preprocessed as for evaluation, never the
split that is scored). Label-free recipes read no labels; "learned_supervised" reads `labeled`
labeled examples per task and is reported as supervised.

    merged, record = recipes.merge_runs(runs, model, base, "learned_output_match")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from jaxmerge import runs as runs_lib
from jaxmerge.merging import learned
from jaxmerge.recipes import registry


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


def check_settings(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The full settings of preset `name` with `params` overriding them, checked."""
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


def task_examples(runs, model_def, count: int, seed: int, cache: dict):
    """Per run, `count` training examples (images, labels), read once per cache."""
    out = []
    for run in runs:
        key = ("inputs", run.directory, count, seed)
        if key not in cache:
            cache[key] = runs_lib.examples(run, model_def, count, seed)
        out.append(cache[key])
    return out


def learn(name: str, runs, model_def, base, weights, settings, seed, cache):
    """Fits preset `name` on the runs; (tree, record) with its coefficients and images used."""
    del weights
    settings = dict(settings)
    images, labeled = settings.pop("images"), settings.pop("labeled")
    supervised = PRESETS[name].supervised
    count = labeled if supervised else images
    examples = task_examples(runs, model_def, count, seed, cache)
    heads = [learned.Head(r.head_def, r.head, r.task.kind, r.task.loss_spec) for r in runs]
    targets = []
    if settings["objective"] == "output_match":
        for run, head, (task_images, _) in zip(runs, heads, examples):
            key = ("targets", run.directory, count, seed)
            if key not in cache:
                cache[key] = learned.single_outputs(model_def, base, run.adapter, head, task_images)
            targets.append(cache[key])
    tree, coefficients, history = learned.learn_merge(
        model_def,
        base,
        [run.adapter for run in runs],
        heads,
        [task_images for task_images, _ in examples],
        key=jax.random.key(seed),
        targets=targets or None,
        labels=[{r.task.target: y} for r, (_, y) in zip(runs, examples)] if supervised else None,
        **settings,
    )
    record = {
        "method": name,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "coefficients": learned.coefficients_to_json(coefficients),
        "objective": [float(history[0]), float(history[-1])],
        "split": sorted({run.task.train_split for run in runs}),
        "images_per_task": 0 if supervised else count,
        "labeled_per_task": count if supervised else 0,
    }
    return tree, record


def _register(name: str, preset: Preset) -> None:
    def run(runs, model_def, base, weights, settings, seed, cache):
        return learn(name, runs, model_def, base, weights, settings, seed, cache)

    registry.register(
        name,
        reads="labeled" if preset.supervised else "unlabeled",
        check=lambda params: check_settings(name, params),
        about=preset.about,
    )(run)


for _name, _preset in PRESETS.items():
    _register(_name, _preset)
