"""Zero-shot prompts as task data: each classification task's class names and prompt templates.

`jaxmerge.text_heads` writes a task's CLIP classifier from them. Class names are the TFDS
label names made readable (`CLASS_NAMES` replaces them where TFDS has codes or numbers);
templates are `TEMPLATES`. Both differ from the lists of the task-arithmetic code base (more
templates per dataset), so zero-shot accuracy can differ from published zero-shot numbers by a
point or two; merged-model comparisons within jaxmerge are unaffected. Tables are keyed by the
task's dataset (`table_key`), so every task on a dataset shares its prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jaxmerge.tasks import registry

TEMPLATES = {
    "default": ("a photo of a {}.",),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "cars": ("a photo of a {}.", "a photo of the {}, a type of car.", "a photo of my {}."),
    "resisc45": ("satellite imagery of {}.", "aerial imagery of {}.", "a satellite photo of {}."),
    "eurosat": ("a centered satellite photo of {}.", "a satellite photo of {}."),
    "svhn": ('a photo of the number: "{}".',),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
    ),
    "mnist": ('a photo of the number: "{}".',),
    "dtd": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} object."),
}
# TFDS label names that are not words.
CLASS_NAMES = {
    "eurosat": (
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land",
        "permanent crop land", "residential buildings or homes or apartments", "river",
        "lake or sea",
    ),
}  # fmt: skip


def readable(name: str) -> str:
    """'/a/abbey' -> 'abbey', 'AM_General_Hummer_SUV_2000' -> 'AM General Hummer SUV 2000'."""
    name = re.sub(r"^/?[a-z]/", "", name)  # SUN397's '/a/abbey'
    return name.replace("_", " ").replace("/", " ").strip()


def table_key(task: registry.Task) -> str:
    """The `TEMPLATES` / `CLASS_NAMES` key of a task: its dataset's name, shortened."""
    key = task.dataset.split("/")[0].split(":")[0].replace("cars196", "cars")
    return {"svhn_cropped": "svhn", "gtsrb": "gtsrb"}.get(key, key)


def suite_classes(task_names: Sequence[str], data_dir: str) -> tuple[dict, dict]:
    """({task: class names}, {task: templates}) of registered tasks, names from TFDS."""
    classes, templates = {}, {}
    for name in task_names:
        task = registry.get(name)
        key = table_key(task)
        if key in CLASS_NAMES:
            names = list(CLASS_NAMES[key])
        else:
            import tensorflow_datasets as tfds

            builder = tfds.builder(task.dataset, data_dir=data_dir)
            names = [readable(n) for n in builder.info.features[task.target].names]
        if len(names) != task.outputs:
            raise ValueError(f"{name}: {len(names)} class names for {task.outputs} outputs")
        classes[name], templates[name] = names, TEMPLATES.get(key, TEMPLATES["default"])
    return classes, templates


def has_class_names(task: registry.Task) -> bool:
    """Whether the task's class names are in `CLASS_NAMES` (no TFDS dataset needs reading)."""
    return table_key(task) in CLASS_NAMES
