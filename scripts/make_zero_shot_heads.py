r"""The reference for the zero-shot heads file, in torch and transformers.

Users make the file with `python -m jaxmerge zero_shot_heads` (JAX, no torch; same flags, same
arrays). This script computes it with transformers' `CLIPModel` and tokenizer: it wrote
tests/golden/clip/zero_shot.npz (`scripts/make_golden_clip.py`), which the JAX command is
checked against (`tests/test_clip_text.py`). It takes the class names and templates from
`jaxmerge.tasks.prompts`. In a virtualenv with torch, transformers and jaxmerge, on a CLIP
checkpoint saved with `save_pretrained` (model and tokenizer, e.g.
openai/clip-vit-base-patch32), after preparing the datasets:

    python scripts/make_zero_shot_heads.py --model ~/models/clip-vit-base-patch32 \
        --data_dir ~/tensorflow_datasets --output ~/models/clip-vit-base-patch32/zero_shot.npz

The file's arrays, class names and templates are described in `jaxmerge/text_heads.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, ROOT)
# The tables live in the library, which computes the same file in JAX.
from jaxmerge.tasks.prompts import CLASS_NAMES, TEMPLATES, readable, suite_classes  # noqa: E402

__all__ = [
    "CLASS_NAMES",
    "TEMPLATES",
    "class_embeddings",
    "main",
    "readable",
    "suite_classes",
    "zero_shot_arrays",
]


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a CLIPModel folder with its tokenizer")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--tasks", default="", help="comma-separated; default: the CLIP suite")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer, CLIPModel

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
