"""Fuse trained runs into one gated multi-task model (`jaxmerge.fusion`): the settings of
`python -m jaxmerge merge --fuse static|router|mixture`, checked before anything loads, and the fit
of the gates on each task's training images.

    settings = fuse.check("mixture", {"steps": 300})
    gates, record = fuse.fuse_runs(runs, model_def, base, "mixture", settings, seed=0)

The gates are fitted label-free by output matching (`fusion.learn_gates`) on `images`
unlabeled images of each task's training split, the images `learned_output_match` reads
(`recipes.learned.task_examples`, never the split that is scored). "static" fits one gate per
adapted layer and adapter; "router" first fits those, then a per-image linear router started
from them (the router starts where the static fusion ended); "mixture" fits a router per target
that takes each image for one task and a table of gates per task (`fusion`'s module
docstring). Unlike a merge recipe, the result does not fold into the base: a router's gates
depend on the image.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxmerge import adapter_stack, fusion, learned
from jaxmerge.recipes import learned as learned_recipes

Tree = Any
GATINGS = fusion.GATINGS
# The fits each gating runs, in order, each started where the previous one ended.
FITS = {"static": ("static",), "router": ("static", "router"), "mixture": ("mixture",)}
DEFAULTS = {"images": 256, "steps": 300, "learning_rate": 0.02, "batch_size": 16, "match": "kl"}


def check(gating: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full settings (DEFAULTS overridden by `params`, `--merge_param`) for `gating`.

    Raises:
      ValueError: one line naming the flag or setting, the value and what is allowed.
    """
    if gating not in GATINGS:
        raise ValueError(f"--fuse: got {gating!r}; allowed: one of {list(GATINGS)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"--merge_param: --fuse got unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}"
        )
    settings = {**DEFAULTS, **params}
    for field in ("images", "steps", "batch_size"):
        value = settings[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--merge_param {field}: got {value!r}; allowed: an integer >= 1")
    rate = settings["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"--merge_param learning_rate: got {rate!r}; allowed: a number > 0")
    settings["learning_rate"] = float(rate)
    if settings["match"] not in fusion.MATCHES:
        raise ValueError(
            f"--merge_param match: got {settings['match']!r}; allowed: one of "
            f"{list(fusion.MATCHES)}"
        )
    if settings["batch_size"] > settings["images"]:
        raise ValueError(
            f"--merge_param batch_size: got {settings['batch_size']}; allowed: at most images "
            f"({settings['images']})"
        )
    return settings


def stack_runs(runs: Sequence[Any]) -> Tree:
    """The runs' adapters stacked in the order given (`adapter_stack.stack`)."""
    return adapter_stack.stack([r.adapter for r in runs], [f"--run {r.directory}" for r in runs])


def fuse_runs(
    runs: Sequence[Any],
    model_def,
    base: Tree,
    gating: str,
    settings: Mapping[str, Any],
    seed: int = 0,
    cache: dict | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fits the gates of the runs' adapters fused on `base` (see the module docstring).

    Args:
      runs: loaded LoRA runs on one base and model (`runs.base_of`), adapter t for task t.
      gating, settings: as `check` returns them; seed: the images read and the batches drawn.
      cache: as in `recipes.merge_runs` (each task's images, read once).

    Returns:
      (gates {target path: gate}, record): the gating, the settings, the seed, the objective
      [first, last] of each fit, the seconds (in all, and of the fits alone), the split and
      the images read per task.
    """
    settings = check(gating, settings)
    cache = {} if cache is None else cache
    start = time.perf_counter()
    count = settings["images"]
    examples = learned_recipes.task_examples(runs, model_def, count, seed, cache)
    heads = [learned.Head(r.head_def, r.head, r.task.kind, r.task.loss_spec) for r in runs]
    inputs = [images for images, _ in examples]
    targets = []
    for run, head, images in zip(runs, heads, inputs):
        key = ("targets", run.directory, count, seed)  # shared with learned_output_match
        if key not in cache:
            cache[key] = learned.single_outputs(model_def, base, run.adapter, head, images)
        targets.append(cache[key])
    stacked = stack_runs(runs)
    fit = {k: settings[k] for k in ("steps", "learning_rate", "batch_size", "match")}
    objective, fit_seconds = {}, {}
    gates: Any = 1.0
    for step in FITS[gating]:
        # The router starts from the static fit: a study that runs both gatings on the same
        # runs and cache fits the static gates once (its seconds still count in the router's).
        fit_key = ("gates", step, tuple(r.directory for r in runs), seed, tuple(fit.items()))
        if fit_key not in cache:
            fit_start = time.perf_counter()
            gates, history = fusion.learn_gates(
                model_def,
                base,
                stacked,
                heads,
                inputs,
                gating=step,
                init=gates,
                targets=targets,
                key=jax.random.key(seed),
                **fit,
            )
            spent = time.perf_counter() - fit_start
            cache[fit_key] = (gates, [float(history[0]), float(history[-1])], spent)
        gates, objective[step], fit_seconds[step] = cache[fit_key]
    record = {
        "gating": gating,
        "settings": dict(settings),
        "seed": seed,
        "objective": objective,
        "seconds": round(time.perf_counter() - start, 3),
        "fit_seconds": round(sum(fit_seconds.values()), 3),
        "split": sorted({run.task.train_split for run in runs}),
        "images_per_task": [int(x.shape[0]) for x in inputs],
    }
    return gates, record
