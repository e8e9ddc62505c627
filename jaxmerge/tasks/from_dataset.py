"""A task defined by a dataset's name alone: no Python registration.

    python -m jaxmerge.train --config configs/adapter.py:dataset=image_folder/shapes-size64

The head kind comes from the target feature: a `ClassLabel` is classification with its number
of classes, a scalar float `Tensor` is regression (standardised with the mean and standard
deviation of up to `STATS_EXAMPLES` training targets, L1 loss, error in the target's units).
`kind` overrides it: "regression" on class indices (an ordinal label), or "classification" on
integer targets with `outputs` classes. Landmark tasks need their normalising points and flip
permutation, so they stay registered tasks (`jaxmerge/tasks/`).

A run records the task it trained (`registry.to_record`), so evaluate, merge and predict load
it in any process.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxmerge.tasks.registry import TASKS, Task

INFERRED_KINDS = ("classification", "regression")
STATS_EXAMPLES = 2000


def default_name(dataset: str) -> str:
    """'image_folder/shapes-size64' -> 'shapes'; 'eurosat/rgb:2.0.0' -> 'eurosat_rgb'."""
    builder, _, config = dataset.split(":")[0].partition("/")
    if builder == "image_folder" and "-size" in config:
        return config.rsplit("-size", 1)[0].replace("-", "_")
    return "_".join(p for p in (builder, config) if p).replace("-", "_")


def _field_error(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"config.dataset.{field}: got {value!r}; allowed: {allowed}")


@functools.lru_cache(maxsize=16)
def define(
    name: str,
    dataset: str,
    data_dir: str,
    manual_dir: str = "",
    kind: str = "",
    target: str = "",
    outputs: int = 0,
    train_split: str = "",
    eval_split: str = "",
    flip: bool = True,
) -> Task:
    """The Task `name` on the prepared TFDS dataset `dataset` (prepared first when it is one of
    jaxmerge's builders given its `manual_dir`); empty arguments are inferred.

    Raises:
      ValueError: naming the config field, its value and what is allowed.
    """
    from jaxmerge import data

    if name in TASKS:
        raise ValueError(
            f"config.task: {name!r} is a registered task; a task defined by "
            f"config.dataset.name={dataset!r} needs a name of its own, e.g. "
            f"--config.task={default_name(dataset)}"
        )
    if kind and kind not in INFERRED_KINDS:
        raise _field_error("kind", kind, f"'' (inferred) or one of {INFERRED_KINDS}")
    data.ensure_prepared(dataset, data_dir, manual_dir)
    builder = data.sources.builder(dataset, data_dir)
    features, splits = builder.info.features, list(builder.info.splits)
    target = target or "label"
    if target not in features or target == "image":
        allowed = [k for k in features if k != "image"]
        raise _field_error("target", target, f"a feature of {dataset!r}: {allowed}")
    train_split = train_split or "train"
    eval_split = eval_split or next((s for s in ("test", "validation") if s in splits), "")
    for field, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in splits:
            raise _field_error(field, split, f"a split of {dataset!r}: {splits}")

    feature = features[target]
    classes = getattr(feature, "num_classes", None)
    scalar = tuple(getattr(feature, "shape", (None,))) == ()
    kind = kind or ("classification" if classes else "regression" if scalar else "")
    spec = {}
    if kind == "classification":
        outputs = outputs or classes or 0
        if outputs < 2:
            raise _field_error(
                "outputs", outputs, f"the number of classes (>= 2) of {target!r} ({feature})"
            )
    elif kind == "regression" and scalar:
        values = _targets(data.sources.open_source(dataset, train_split, data_dir), target)
        spec = {"mean": float(values.mean()), "std": float(values.std() or 1.0), "loss": "l1"}
        outputs = 1
    else:
        raise _field_error(
            "target",
            target,
            f"a ClassLabel (classification) or a scalar Tensor (regression); {target!r} is "
            f"{feature}. Landmarks need a registered Task (jaxmerge/tasks/)",
        )
    return Task(
        name,
        dataset,
        kind,
        outputs,
        target=target,
        train_split=train_split,
        eval_split=eval_split,
        spec=spec,
        flip=flip,
        suite="user",
        about=f"{dataset} ({kind}, defined by its dataset)",
    )


def _targets(source, target: str) -> np.ndarray:
    """Up to STATS_EXAMPLES targets, spread evenly over the split."""
    picks = np.linspace(0, len(source) - 1, min(len(source), STATS_EXAMPLES)).astype(int)
    return np.asarray([source[int(i)][target] for i in picks], np.float64)
