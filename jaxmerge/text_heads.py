"""Zero-shot heads from text: CLIP text embeddings of class-name prompts, in JAX, as a file.

`write_heads` writes the heads file of a task set from a Hugging Face `CLIPModel` folder with
its tokenizer, once per CLIP checkpoint (`python -m jaxmerge zero_shot_heads` is the command
over it). The file (`jaxmerge.zero_shot.load_heads` reads it) holds, as float32:
  scale                     exp(logit_scale) of the checkpoint.
  visual_projection         (width, E) the image projection, as (in, out).
  <task>/classes            (C, E) per class: the mean over templates of the unit-normalised
                            text embeddings of "template.format(class name)", normalised again
                            (the classifier of Radford et al. 2021 and of task arithmetic).
  <task>/class_names        (C,) the class names used.
  templates/<task>          the prompt templates used.
  model                     the --model path, for the record.

so that `logits = scale * normalize(pooled @ visual_projection) @ classes.T`.

The text tower is `models.clip_text.TextTower`, loaded by `models.clip_text.load_hf`;
prompts are tokenized with the folder's `tokenizer.json` (the `tokenizers` package), each
class's prompts padded to the longest, as `tokenizer(prompts, padding=True)` does. The
reference is `scripts/make_zero_shot_heads.py` (torch and transformers), which wrote
tests/golden/clip/zero_shot.npz: this module's file matches it (`tests/test_clip_text.py`).

Class names and templates are task data (`jaxmerge.tasks.prompts`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import extras, logs, tasks
from jaxmerge.interop import files
from jaxmerge.models import clip_text
from jaxmerge.tasks import prompts as task_prompts

# Compiled prompt lengths are rounded up to a multiple of this, so that a task's classes share
# a few compiled shapes instead of one per token count.
LENGTH_MULTIPLE = 8


# ----------------------------------------------------------------------------- tokens


def load_tokenizer(folder: str):
    """The folder's `tokenizer.json` as a `tokenizers.Tokenizer` that pads as transformers'
    `tokenizer(prompts, padding=True)`: to the longest prompt, with `tokenizer_config.json`'s
    pad token and padding side (CLIP's: "<|endoftext|>", right), and never truncates."""
    Tokenizer = extras.require("tokenizers").Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    settings = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            settings = json.load(f)
    pad_token = settings.get("pad_token") or "<|endoftext|>"
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(
            f"{folder!r}: pad token {pad_token!r} (tokenizer_config.json) is not in "
            f"tokenizer.json's vocabulary"
        )
    tokenizer.no_truncation()
    side = settings.get("padding_side", "right")
    tokenizer.enable_padding(direction=side, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def tokenize(tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (N, T) int32, T the longest prompt's token count."""
    encodings = tokenizer.encode_batch(list(prompts))
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask


def pad_length(ids: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`ids` and `mask` padded on the right to `length` tokens, the new tokens masked.

    Leaves every prompt's text embedding as it was: causal attention keeps the new tokens out
    of every earlier one, and they repeat each prompt's first token, so the first position of
    any token (where `clip_text.end_of_text` pools) does not move.
    """
    extra = length - ids.shape[1]
    ids = np.concatenate([ids, np.repeat(ids[:, :1], extra, axis=1)], axis=1)
    return ids, np.pad(mask, ((0, 0), (0, extra)))


# ----------------------------------------------------------------------------- maths


def class_embedding(text_embeds: jax.Array) -> jax.Array:
    """(E,) the classifier row of one class from its (templates, E) text embeddings:
    `normalize(mean(normalize(text_embeds)))`."""
    unit = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    mean = unit.mean(axis=0)
    return mean / jnp.linalg.norm(mean)


@functools.partial(jax.jit, static_argnums=0)
def _class_embedding(model: clip_text.TextTower, params, ids, mask) -> jax.Array:
    return class_embedding(model.apply({"params": params}, ids, mask)["text_embeds"])


def class_tokens(
    tokenizer, class_names: Sequence[str], templates: Sequence[str], max_length: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, (input_ids, attention_mask) of its prompts `template.format(name)`: padded to
    the longest as transformers pads them, then to a multiple of `LENGTH_MULTIPLE` (at most
    `max_length`; see `pad_length`).

    Raises:
      ValueError: a prompt longer than `max_length` tokens, naming it.
    """
    batches = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        ids, mask = tokenize(tokenizer, prompts)
        if ids.shape[1] > max_length:
            longest = prompts[int(np.argmax(mask.sum(axis=1)))]
            raise ValueError(
                f"prompt {longest!r}: {ids.shape[1]} tokens; allowed: at most {max_length}, the "
                f"text tower's max_position_embeddings"
            )
        length = min(-(-ids.shape[1] // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_length)
        batches.append(pad_length(ids, mask, length))
    return batches


def class_embeddings(
    model: clip_text.TextTower,
    params,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    on_class: Callable[[], None] = lambda: None,
) -> np.ndarray:
    """(C, E) float32: `class_embedding` of each class's tokens (`class_tokens`); `on_class`
    is called after each class."""
    rows = []
    for ids, mask in batches:
        rows.append(np.asarray(_class_embedding(model, params, ids, mask)))
        on_class()
    return np.stack(rows).astype(np.float32)


def zero_shot_arrays(folder: str, task_classes: Mapping, task_templates: Mapping) -> dict:
    """The file's arrays (see the module doc; all but `model`) for {task: class names} with
    {task: templates}, from the CLIPModel folder `folder`, with a progress bar over classes.
    Every prompt is tokenized (and checked) before the text tower runs."""
    kwargs, params, extras = clip_text.load_hf(folder)
    model, tokenizer = clip_text.TextTower(**kwargs), load_tokenizer(folder)
    tokens = {}
    for task, names in task_classes.items():
        try:
            tokens[task] = class_tokens(tokenizer, names, task_templates[task], model.max_length)
        except ValueError as error:
            raise ValueError(f"{folder!r}, task {task!r}: {error}") from None
    arrays = {
        "scale": np.exp(np.float32(extras["logit_scale"])).astype(np.float32),
        "visual_projection": extras["visual_projection"].astype(np.float32),
    }
    bar = logs.progress(total=sum(map(len, tokens.values())), desc="zero-shot heads", unit="class")
    try:
        for task, names in task_classes.items():
            bar.set_postfix_str(task)
            arrays[f"{task}/classes"] = class_embeddings(model, params, tokens[task], bar.update)
            arrays[f"{task}/class_names"] = np.asarray(names)
            arrays[f"templates/{task}"] = np.asarray(task_templates[task])
    finally:
        bar.close()
    return arrays


# ----------------------------------------------------------------------------- the file


def check_inputs(model: str, task_names: Sequence[str], output: str, data_dir: str) -> None:
    """Raises a ValueError naming the flag, the value and what is allowed for the first bad
    input; reads only file headers, so it runs before anything is computed."""
    allowed_model = (
        "a Hugging Face CLIPModel folder with its tokenizer (config.json, model.safetensors, "
        "tokenizer.json), saved with save_pretrained"
    )
    if not output.endswith(".npz"):
        raise ValueError(f"--output: {output!r}; allowed: a path ending in .npz")
    if os.path.exists(output):
        raise ValueError(
            f"--output: {output!r} exists; refusing to overwrite it: remove it or choose another "
            f"path"
        )
    if not os.path.isdir(model):
        raise ValueError(f"--model: {model!r} is not a folder; allowed: {allowed_model}")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model: {model!r} has no config.json; allowed: {allowed_model}")
    try:
        kind = files.read_json(os.path.join(model, "config.json")).get("model_type")
    except ValueError as error:
        raise ValueError(f"--model: {error}; allowed: {allowed_model}") from None
    if kind != "clip":
        raise ValueError(
            f"--model: {model!r} is a {kind!r} model, without a text tower; allowed: "
            f"{allowed_model}"
        )
    if not os.path.isfile(os.path.join(model, "tokenizer.json")):
        raise ValueError(f"--model: {model!r} has no tokenizer.json; allowed: {allowed_model}")
    names = files.tensor_names(model)
    if not names:
        raise ValueError(f"--model: {model!r} has no model.safetensors; allowed: {allowed_model}")
    if not any(n.startswith("text_model.") for n in names):
        raise ValueError(
            f"--model: {model!r} has no text tower weights (no 'text_model.*' tensors in "
            f"model.safetensors); allowed: {allowed_model}"
        )
    known = sorted(n for n, t in tasks.TASKS.items() if t.kind == "classification")
    for name in task_names:
        if name not in known:
            raise ValueError(f"--tasks: unknown task {name!r}; allowed: {known}")
    needs_tfds = [n for n in task_names if not task_prompts.has_class_names(tasks.get(n))]
    if needs_tfds and not os.path.isdir(data_dir):
        raise ValueError(
            f"--data_dir: {data_dir!r} is not a folder; allowed: the TFDS data folder where "
            f"{', '.join(needs_tfds)} were prepared (their class names are read from it)"
        )


def write_heads(
    model: str, output: str, task_names: Sequence[str] | None = None, data_dir: str = ""
) -> dict[str, list[str]]:
    """Writes the heads file of `task_names` (default: the CLIP suite) to `output`, a new
    `.npz`, from the CLIPModel folder `model`. Returns {task: class names}.

    Raises:
      ValueError: a bad input (see `check_inputs`), before anything is computed.
    """
    data_dir = data_dir or os.path.expanduser("~/tensorflow_datasets")
    task_names = list(task_names or tasks.clip_suite.TASKS)
    check_inputs(model, task_names, output, data_dir)
    classes, templates = task_prompts.suite_classes(task_names, data_dir)
    arrays = zero_shot_arrays(model, classes, templates)
    arrays["model"] = np.asarray(os.path.abspath(model))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "xb") as f:  # "x": a file that appeared meanwhile is not overwritten
        np.savez(f, **arrays)
    return classes
