"""A task defined by a dataset's name alone: no Python registration.

    python -m jaxmerge train --config configs/adapter.py:dataset=image_folder/shapes-size64

The head kind comes from the target feature: a `ClassLabel` is classification with its number
of classes, a scalar float `Tensor` is regression (standardised with the mean and standard
deviation of up to `STATS_EXAMPLES` training targets, L1 loss, error in the target's units).
A float `Tensor` of shape (K, 2) is landmarks: K points, (x, y) relative to the image size, L1
loss, scored by NME, normalised by the distance between the points `norm_points` (e.g. the
outer eye corners) or, without them, by the image size. Flipping landmarks must also swap left
and right points, so a landmark task flips only when it is given `flip_permutation`.
`kind` overrides it: "regression" on class indices (an ordinal label), or "classification" on
integer targets with `outputs` classes.

A run records the task it trained (`registry.to_record`), so evaluate, merge and predict load
it in any process.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxmerge.tasks.registry import TASKS, Task

INFERRED_KINDS = ("classification", "regression", "landmarks")
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
    norm_points: tuple[int, ...] | None = None,
    flip_permutation: tuple[int, ...] | None = None,
) -> Task:
    """The Task `name` on the prepared TFDS dataset `dataset` (prepared first when it is one of
    jaxmerge's builders given its `manual_dir`); empty arguments are inferred.

    Raises:
      ValueError: naming the config field, its value and what is allowed.
    """
    from jaxmerge import input_pipeline

    if name in TASKS:
        raise ValueError(
            f"config.task: {name!r} is a registered task; a task defined by "
            f"config.dataset.name={dataset!r} needs a name of its own, e.g. "
            f"--config.task={default_name(dataset)}"
        )
    if kind and kind not in INFERRED_KINDS:
        raise _field_error("kind", kind, f"'' (inferred) or one of {INFERRED_KINDS}")
    input_pipeline.ensure_prepared(dataset, data_dir, manual_dir)
    builder = input_pipeline.sources.builder(dataset, data_dir)
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
    shape = tuple(getattr(feature, "shape", (None,)))
    scalar = shape == ()
    points = len(shape) == 2 and shape[1] == 2 and np.issubdtype(feature.np_dtype, np.floating)
    inferred = "classification" if classes else "regression" if scalar else ""
    kind = kind or inferred or ("landmarks" if points else "")
    spec = {}
    if kind != "landmarks":
        for field, value in (("norm_points", norm_points), ("flip_permutation", flip_permutation)):
            if value is not None:
                typed = ",".join(map(str, value))
                raise _field_error(field, typed, f"'' for a {kind or 'non-landmark'} task")
    if kind == "classification":
        outputs = outputs or classes or 0
        if outputs < 2:
            raise _field_error(
                "outputs", outputs, f"the number of classes (>= 2) of {target!r} ({feature})"
            )
    elif kind == "regression" and scalar:
        values = _targets(
            input_pipeline.sources.open_source(dataset, train_split, data_dir), target
        )
        spec = {"mean": float(values.mean()), "std": float(values.std() or 1.0), "loss": "l1"}
        outputs = 1
    elif kind == "landmarks" and points:
        count = shape[0]
        spec = _landmark_spec(count, norm_points, flip_permutation)
        flip = flip and flip_permutation is not None  # a flip without the swap mislabels
        outputs = 2 * count
    else:
        raise _field_error(
            "target",
            target,
            f"a ClassLabel (classification), a scalar Tensor (regression) or a float Tensor of "
            f"shape (K, 2) (landmarks); {target!r} is {feature}",
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
        flip_permutation=flip_permutation if flip else None,
        suite="user",
        about=f"{dataset} ({kind}, defined by its dataset)",
    )


def _landmark_spec(count: int, norm_points, permutation) -> dict:
    """The landmark head's spec, with `norm_points` and `permutation` checked against the
    dataset's `count` points."""
    if norm_points is not None and (
        len(norm_points) != 2
        or norm_points[0] == norm_points[1]
        or not all(0 <= i < count for i in norm_points)
    ):
        allowed = f"two different point indices in 0..{count - 1}, e.g. '0,1'"
        raise _field_error("norm_points", ",".join(map(str, norm_points)), allowed)
    if permutation is not None and sorted(permutation) != list(range(count)):
        allowed = f"a permutation of 0..{count - 1}: point i moves to point permutation[i]"
        raise _field_error("flip_permutation", ",".join(map(str, permutation)), allowed)
    return {} if norm_points is None else {"norm_points": tuple(norm_points)}


def _targets(source, target: str) -> np.ndarray:
    """Up to STATS_EXAMPLES targets, spread evenly over the split."""
    picks = np.linspace(0, len(source) - 1, min(len(source), STATS_EXAMPLES)).astype(int)
    return np.asarray([source[int(i)][target] for i in picks], np.float64)
