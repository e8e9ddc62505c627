r"""Writes the zero-shot heads of a task set: CLIP text embeddings of class-name prompts.

Run once, in a virtualenv with torch and transformers, on a CLIP checkpoint saved with
`save_pretrained` (model and tokenizer, e.g. openai/clip-vit-base-patch32), after preparing the
datasets (the class names are read from each task's TFDS builder):

    python scripts/make_zero_shot_heads.py --model ~/models/clip-vit-base-patch32 \
        --data_dir ~/tensorflow_datasets --output ~/models/clip-vit-base-patch32/zero_shot.npz

The file (`jaxmerge.zero_shot.load_heads` reads it; no torch needed there) holds, as float32:
  scale                     exp(logit_scale) of the checkpoint.
  visual_projection         (width, E) the image projection, as (in, out).
  <task>/classes            (C, E) per class: the mean over templates of the unit-normalised
                            text embeddings of "template.format(class name)", normalised again
                            (the classifier of Radford et al. 2021 and of task arithmetic).
  <task>/class_names        (C,) the class names used.
  templates/<task>          the prompt templates used.
  model                     the --model path, for the record.

so that `logits = scale * normalize(pooled @ visual_projection) @ classes.T`.

Class names are the TFDS label names made readable (`CLASS_NAMES` replaces them where TFDS has
codes or numbers); templates are `TEMPLATES`. Both differ from the lists of the task-arithmetic
code base (more templates per dataset), so zero-shot accuracy can differ from published
zero-shot numbers by a point or two; merged-model comparisons within jaxmerge are unaffected.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def class_embeddings(model, tokenizer, class_names, templates) -> np.ndarray:
    """(C, E) unit-normalised class embeddings: mean over templates of normalised text
    embeddings, normalised again."""
    import torch

    rows = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            embeds = model.get_text_features(**tokens)
        embeds = getattr(embeds, "pooler_output", embeds)  # transformers 5 returns an output
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        mean = embeds.mean(0)
        rows.append((mean / mean.norm()).numpy())
    return np.stack(rows).astype(np.float32)


def zero_shot_arrays(model, tokenizer, task_classes: dict, task_templates: dict) -> dict:
    """The file's arrays for {task: class names} with {task: templates}."""
    arrays = {
        "scale": np.asarray(model.logit_scale.exp().item(), np.float32),
        "visual_projection": model.visual_projection.weight.detach().numpy().T.astype(np.float32),
    }
    for task, names in task_classes.items():
        templates = task_templates[task]
        arrays[f"{task}/classes"] = class_embeddings(model, tokenizer, names, templates)
        arrays[f"{task}/class_names"] = np.asarray(names)
        arrays[f"templates/{task}"] = np.asarray(templates)
    return arrays


def suite_classes(task_names, data_dir: str) -> tuple[dict, dict]:
    """({task: class names}, {task: templates}) of registered tasks, names from TFDS."""
    import tensorflow_datasets as tfds

    sys.path.insert(0, ROOT)
    from jaxmerge import tasks

    classes, templates = {}, {}
    for name in task_names:
        task = tasks.get(name)
        key = task.dataset.split("/")[0].split(":")[0].replace("cars196", "cars")
        key = {"svhn_cropped": "svhn", "gtsrb": "gtsrb"}.get(key, key)
        if key in CLASS_NAMES:
            names = list(CLASS_NAMES[key])
        else:
            builder = tfds.builder(task.dataset, data_dir=data_dir)
            names = [readable(n) for n in builder.info.features[task.target].names]
        if len(names) != task.outputs:
            raise ValueError(f"{name}: {len(names)} class names for {task.outputs} outputs")
        classes[name], templates[name] = names, TEMPLATES.get(key, TEMPLATES["default"])
    return classes, templates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a CLIPModel folder with its tokenizer")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--tasks", default="", help="comma-separated; default: the CLIP suite")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer, CLIPModel

    sys.path.insert(0, ROOT)
    from jaxmerge.tasks import clip_suite

    model = CLIPModel.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    names = [t for t in args.tasks.split(",") if t] or list(clip_suite.TASKS)
    classes, templates = suite_classes(names, args.data_dir)
    arrays = zero_shot_arrays(model, tokenizer, classes, templates)
    arrays["model"] = np.asarray(os.path.abspath(args.model))
    np.savez(args.output, **arrays)
    print(f"wrote {args.output}: {', '.join(f'{t} ({len(c)})' for t, c in classes.items())}")


if __name__ == "__main__":
    main()
