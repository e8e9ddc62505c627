"""The task registry: name -> dataset, splits, target, head kind, loss and metric settings.

A task is data, not code: the head kind (`heads.HEAD_KINDS`) supplies the loss and metrics, the
input pipeline supplies the preprocessing. Config strings (`config.task`) are the keys here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxmerge import heads
from jaxmerge.datasets import wflw


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


# ------------------------------------------------------------------ the paper's six tasks
# Kesim & Helli 2024. Images at 224 px for ViT-B/16. The 3 FireRisk classes and the 9 UTKFace age
# bins are jaxmerge's choices (see jaxmerge/datasets/firerisk.py and utkface.py).
register(
    Task(
        "firerisk",
        "firerisk/size224",
        "classification",
        3,
        eval_split="validation",
        suite="paper",
        about="FireRisk aerial images, fire risk in 3 classes",
    )
)
register(
    Task(
        "utkface_age_class",
        "utkface/size224",
        "classification",
        9,
        target="age_class",
        suite="paper",
        about="UTKFace faces, age in 9 classes",
    )
)
register(
    Task(
        "utkface_age",
        "utkface/size224",
        "regression",
        1,
        target="age",
        spec={"mean": 33.3, "std": 19.9, "loss": "l1"},
        suite="paper",
        about="UTKFace faces, age regression (MAE in years)",
    )
)
register(
    Task(
        "expw",
        "expw/size224",
        "classification",
        7,
        suite="paper",
        about="ExpW faces, 7 facial expressions",
    )
)
register(
    Task(
        "wflw",
        "wflw/size224",
        "landmarks",
        2 * 98,
        target="landmarks",
        spec={"norm_points": (60, 72)},
        flip_permutation=tuple(wflw.FLIP_PERMUTATION),
        suite="paper",
        about="WFLW faces, 98 landmarks (NME, inter-ocular)",
    )
)
register(
    Task(
        "galaxy10",
        "galaxy10_decals/size224",
        "classification",
        10,
        suite="paper",
        about="Galaxy10 DECals galaxy morphology, 10 classes",
    )
)

# ------------------------------------------------------------------ offline tasks
# Real data that ships with scikit-learn, scikit-image and Debian; no download needed.
register(
    Task(
        "digits",
        "sklearn_digits",
        "classification",
        10,
        flip=False,
        about="scikit-learn 8x8 digits, 10 classes",
    )
)
register(
    Task(
        "digits_value",
        "sklearn_digits",
        "regression",
        1,
        target="value",
        spec={"mean": 4.5, "std": 2.87, "loss": "l1"},
        flip=False,
        about="scikit-learn digits, the digit's value as regression (MAE)",
    )
)
register(
    Task(
        "fashion_mnist",
        "fashion_mnist_idx",
        "classification",
        10,
        about="Fashion-MNIST from the Debian idx files, 10 classes (pretraining)",
    )
)
register(
    Task(
        "textures",
        "skimage_textures/size32",
        "classification",
        5,
        about="scikit-image textures (brick, grass, gravel, moon, stars), 5 classes",
    )
)
register(
    Task(
        "lfw_faces",
        "lfw_subset",
        "classification",
        2,
        about="scikit-image lfw_subset, face vs non-face",
    )
)
register(
    Task(
        "digit_box",
        "digit_box",
        "landmarks",
        2 * 2,
        target="landmarks",
        spec={"norm_points": (0, 1)},
        flip=False,
        about="scikit-learn digits pasted on a canvas, box corners (NME, box diagonal)",
    )
)
register(
    Task(
        "photo_scenes",
        "photo_scenes",
        "classification",
        8,
        about="crops of eight scikit-image photographs, which photograph (8 classes)",
    )
)
