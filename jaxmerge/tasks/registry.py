"""The registry of tasks: `Task`, `register` and `get`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxmerge import heads


@dataclasses.dataclass(frozen=True)
class Task:
    """One vision task.

    Attributes:
      name: registry key.
      dataset: TFDS builder name (with config, e.g. "utkface/size224"), prepared as array_record.
      kind: head kind: "classification", "regression" or "landmarks".
      outputs: head outputs: classes, 1, or 2 * landmarks.
      target: the feature key holding the label / value / landmarks.
      train_split, eval_split: TFDS split strings.
      spec: what the head kind's loss and metric read: regression `mean`, `std` (targets are
        standardised for the loss, errors reported in the task's units) and `loss` ("l1" or
        "mse"); landmarks `norm_points` (the two landmarks whose distance normalises NME).
      flip: random horizontal flips in training (off where a flip changes the answer).
      flip_permutation: for landmarks, the left/right swap a flip implies.
      suite: "paper" (needs the user's downloads) or "offline" (works on a fresh machine).
      about: one line for tables and the README.
      preprocess: None for `jaxmerge.input_pipeline.default_preprocess` (resize, RGB, crop
        and flip in training, scale to [-1, 1]), or the task's own `preprocess(task,
        image_size, train, crop_padding) -> (example, rng) -> example` with the same signature.
    """

    name: str
    dataset: str
    kind: str
    outputs: int
    target: str = "label"
    train_split: str = "train"
    eval_split: str = "test"
    spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    flip: bool = True
    flip_permutation: tuple[int, ...] | None = None
    suite: str = "offline"
    about: str = ""
    preprocess: Callable[..., Any] | None = None

    @property
    def head_kind(self) -> heads.HeadKind:
        return heads.head_kind(self.kind)

    @property
    def loss_spec(self) -> dict[str, Any]:
        return {"target": self.target, **self.spec}


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    heads.head_kind(task.kind)  # fails early on a typo in the kind
    TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """The registered task `name`; a ValueError lists the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"config.task: unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


# The Task fields a run folder records; `preprocess` is code, recorded by its qualified name.
_RECORDED = ("name", "dataset", "kind", "outputs", "target", "train_split", "eval_split", "spec")


def to_record(task: Task) -> dict[str, Any]:
    """The task as JSON-ready data, so a run can be reloaded where the task is not registered."""
    record = {field: getattr(task, field) for field in _RECORDED}
    record["spec"] = {k: list(v) if isinstance(v, tuple) else v for k, v in task.spec.items()}
    record["flip"] = task.flip
    permutation = task.flip_permutation
    record["flip_permutation"] = [int(i) for i in permutation] if permutation else None
    record["suite"], record["about"] = task.suite, task.about
    fn = task.preprocess
    record["preprocess"] = None if fn is None else f"{fn.__module__}.{fn.__qualname__}"
    return record


def from_record(record: dict[str, Any]) -> Task:
    """The Task a run recorded (`to_record`); a task with its own preprocessing needs the code
    that registers it, so it is refused here."""
    if record.get("preprocess"):
        raise ValueError(
            f"task {record['name']!r} uses its own preprocessing ({record['preprocess']}), "
            "which a run folder cannot carry; import the module that registers the task first"
        )
    permutation = record.get("flip_permutation")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in record["spec"].items()}
    return Task(
        **{field: record[field] for field in _RECORDED if field != "spec"},
        spec=spec,
        flip=record.get("flip", True),
        flip_permutation=tuple(permutation) if permutation else None,
        suite=record.get("suite", "offline"),
        about=record.get("about", ""),
    )


def of_run(name: str, record: dict[str, Any] | None) -> Task:
    """The task of a run: the registered one of that name, else the run's own record of it."""
    if name in TASKS or record is None:
        return get(name)
    return from_record(record)
