"""Learned merges as recipes: named `learned.Settings` of `learned.learn_merge`, fitted on a few
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

from jaxmerge import learned
from jaxmerge import runs as runs_lib
from jaxmerge.recipes import registry


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named learned merge: its settings, and whether it reads labels."""

    settings: learned.Settings
    supervised: bool
    about: str


PRESETS: dict[str, Preset] = {
    "learned_output_match": Preset(
        learned.Settings(objective="output_match", granularity="core"),
        False,
        "label-free: each head's outputs on the merged backbone matched to its single "
        "adapter's; a full mixing matrix of the stacked factors per layer",
    ),
    "learned_output_match_layer": Preset(
        learned.Settings(objective="output_match", granularity="layer"),
        False,
        "label-free output matching with AdaMerging's layer-wise coefficients",
    ),
    "adamerging": Preset(
        learned.Settings(objective="entropy", granularity="layer", init=1.0, bounds=(0.0, 1.0)),
        False,
        "AdaMerging, layer-wise: prediction entropy (classification heads only)",
    ),
    "adamerging_task": Preset(
        learned.Settings(objective="entropy", granularity="task", init=0.3, bounds=(0.0, 1.0)),
        False,
        "AdaMerging, task-wise, its published initialisation 0.3 and range [0, 1]",
    ),
    "adamerging_ties": Preset(
        learned.Settings(
            objective="entropy", granularity="layer", base_merge="ties", init=1.0, bounds=(0, 1)
        ),
        False,
        "AdaMerging++, layer-wise on TIES-processed task vectors (classification heads only)",
    ),
    "learned_supervised": Preset(
        learned.Settings(objective="supervised", granularity="core"),
        True,
        "supervised: each task's own loss on `labeled` labeled training examples",
    ),
}
# Data settings, not `learn_merge` keywords: unlabeled images and labeled examples per task.
DATA_SETTINGS = {"images": 256, "labeled": 64}


def check_settings(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Preset `name` with `params` overriding it, checked: the data settings and every
    `learned.Settings` field (JSON values)."""
    allowed = set(DATA_SETTINGS) | set(learned.FIELDS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"params: learned method {name!r} got unknown parameter(s) {unknown}; allowed: "
            f"{sorted(allowed)}"
        )
    data_settings = {k: params.get(k, v) for k, v in DATA_SETTINGS.items()}
    for field, value in data_settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    fit = PRESETS[name].settings.replace(**{k: v for k, v in params.items() if k in learned.FIELDS})
    return {**data_settings, **fit.to_json()}


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
    fit = learned.Settings(**settings)
    supervised = PRESETS[name].supervised
    count = labeled if supervised else images
    examples = task_examples(runs, model_def, count, seed, cache)
    heads = [learned.Head(r.head_def, r.head, r.task.kind, r.task.loss_spec) for r in runs]
    targets = []
    if fit.objective == "output_match":
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
        fit,
        key=jax.random.key(seed),
        targets=targets or None,
        labels=[{r.task.target: y} for r, (_, y) in zip(runs, examples)] if supervised else None,
    )
    record = {
        "method": name,
        "settings": fit.to_json(),
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
