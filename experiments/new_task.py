r"""A new task from old adapters: gates and a new head over the six offline-suite adapters,
against a new LoRA adapter and head finetuning, at k = 10, 50 and all examples per class.

    nice -n 5 python -m experiments.new_task --adapters /work/exp/wd/seed_0/adapters \
        --workdir ./workdir_new_task --shots 10,50,0 --seeds 0,1,2

measured (36 min on 2 shared CPU cores; experiments/results/new_task/), test accuracy mean over
three draws: at 10 per class compose 0.752, a new LoRA adapter 0.759, head finetuning 0.698;
at 50: 0.769 / 0.800 / 0.747; at all 128: 0.776 / 0.811 / 0.753. Compose beats head
finetuning at every k and a new adapter on draw 0 at 10 per class only (0.792 vs 0.781).

The new task ("new_photos") is real data that none of the six adapters saw, on this machine
without a download: which of six photographs that the offline suite leaves out a 32-pixel crop
shows (scikit-image's retina, immunohistochemistry, cell and stereo_motorcycle left image,
scikit-learn's china and flower), cut as `photo_scenes` cuts its eight: training crops from the
left 60% of each photograph, test crops from the right 40%, so no test pixel is seen in training;
128 training and 32 test crops per class. Fashion-MNIST, the other offline dataset, is the
base's pretraining data; the CLIP suite and the paper's tasks need downloads.

For each k and draw (`compose.per_class`) the k-shot training folder and the whole test folder
are written as an `image_folder` dataset, and three ways are trained on it, each for `--steps`
steps of batch 64 and scored on the test crops:

  compose  static gates (6 adapters x 12 targets = 72 numbers) and a new head over the frozen
           stack (`jaxmerge.compose`), on the k-shot images and `--augment_copies` passes of
           the train path's own crops and flips over them;
  lora     a new rank-8 LoRA adapter and head (`training.train_and_evaluate`, mode "lora", the
           offline suite's settings, its crops and flips);
  head     head finetuning on the frozen base (the same, mode "head").

Seconds are the wall time of training and scoring (compile included) on this machine's two
shared CPU cores. Records go to WORKDIR/new_task.jsonl (a rerun skips what is done); the
markdown table to WORKDIR/new_task.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np
from PIL import Image

from experiments import study
from experiments.configs import offline
from jaxmerge import (
    compose,
    fuse,
    heads,
    input_pipeline,
    logs,
    run_config,
    scoring,
    training,
)
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import photo_scenes

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--adapters", required=True, help="the suite's WORKDIR/seed_S/adapters")
ARGS.add_argument("--workdir", required=True)
ARGS.add_argument("--shots", default="10,50,0", help="examples per class; 0: all of them")
ARGS.add_argument("--seeds", default="0", help="draws of the k-shot examples")
ARGS.add_argument("--steps", type=int, default=300)
ARGS.add_argument("--methods", default="compose,lora,head")
ARGS.add_argument("--gate_learning_rate", type=float, default=0.02)
ARGS.add_argument("--gate_init", type=float, default=0.0)
ARGS.add_argument("--gates", default="adapter", help="compose's gates: adapter or rank")
ARGS.add_argument("--augment_copies", type=int, default=8, help="compose's augmented passes")

TASK = "new_photos"
OLD_TASKS = ("digits", "digits_value", "digit_box", "textures", "lfw_faces", "photo_scenes")
PHOTOS = ("retina", "immunohistochemistry", "cell", "motorcycle", "china", "flower")
TRAIN_PER_PHOTO, TEST_PER_PHOTO = 128, 32


def load_photo(name: str) -> np.ndarray:
    """The uint8 (H, W, 3) photograph `name` (scikit-image or scikit-learn's samples)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    if name in ("china", "flower"):
        image = load_sample_image(f"{name}.jpg")
    elif name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def write_photos(root: str) -> None:
    """root/{train,test}/<photo>/<i>.png: the new task's crops (module docstring)."""
    if os.path.isdir(os.path.join(root, "test")):
        return
    for label, name in enumerate(PHOTOS):
        photo = load_photo(name)
        cut = int(photo.shape[1] * photo_scenes.TRAIN_WIDTH_FRACTION)
        for split, seed, columns, count in (
            ("train", 0, (0, cut), TRAIN_PER_PHOTO),
            ("test", 1, (cut, photo.shape[1]), TEST_PER_PHOTO),
        ):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            crops = photo_scenes.scene_crops(photo, columns, count, [seed, label])
            for i, crop in enumerate(crops):
                Image.fromarray(crop).save(os.path.join(folder, f"{i:03d}.png"))


def write_subset(root: str, target: str, shots: int, seed: int) -> None:
    """`target`/{train,test}: `shots` training crops per class (`compose.per_class`; 0: all)
    and every test crop."""
    files = [(name, f) for name in PHOTOS for f in sorted(os.listdir(f"{root}/train/{name}"))]
    picks = compose.per_class([PHOTOS.index(name) for name, _ in files], shots, seed)
    if os.path.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(os.path.join(root, "test"), os.path.join(target, "test"))
    for i in picks:
        name, f = files[i]
        os.makedirs(os.path.join(target, "train", name), exist_ok=True)
        shutil.copy2(os.path.join(root, "train", name, f), os.path.join(target, "train", name))


def task_config(args, folder: str, name: str, mode: str, seed: int):
    """The offline suite's training config for the new task on the image folder `folder`."""
    config = offline.get_config("seeds=1").train
    config.task, config.mode, config.seed = TASK, mode, seed
    config.steps, config.warmup_steps = args.steps, args.steps // 10
    config.checkpoint_every = args.steps
    config.dataset.name = f"image_folder/{name}-size32"
    config.data_dir = os.path.join(args.workdir, "tfds")
    config.manual_dir = folder
    return config


def train_examples(task, config, model, copies: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the training split, preprocessed for evaluation (`runs.examples`),
    followed by `copies` passes of the train path's own augmentation (`config.crop_padding`
    shifts and flips, `input_pipeline.preprocess(train=True)`), each pass with its own seed."""
    settings = run_config.resolve(config).data
    source = input_pipeline.open_split(task, task.train_split, settings)
    normalization = settings.normalization
    rows = []
    for copy in range(copies + 1):
        train = copy > 0
        padding = settings.crop_padding if train else 0
        preprocess = input_pipeline.preprocess(
            task, model.image_size, train, padding, **normalization
        )
        rng = np.random.default_rng(copy)
        rows += [preprocess(source[i], rng) for i in range(len(source))]
    images = np.stack([r["image"] for r in rows]).astype(np.float32)
    return images, np.asarray([r[task.target] for r in rows])


def run_compose(args, config, model, base, stacked, seed: int) -> dict:
    start = time.perf_counter()
    parts = run_config.resolve(config)
    task = parts.task
    head_def = heads.build(parts.head, task, model.width)
    images, labels = train_examples(task, config, model, args.augment_copies)
    settings = compose.Settings(
        steps=args.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        gate_learning_rate=args.gate_learning_rate,
        gate_init=args.gate_init,
        gates=args.gates,
    )
    gates, head, record = compose.learn_composition(
        model, base, stacked, head_def, task, images, labels, settings, jax.random.key(seed)
    )
    scorer = scoring.Scorer(task, head_def, model, parts.data, None, parts.model.family)
    result = scorer(base, head, compose.composed_tree(stacked, gates))
    gate_values = compose.gates_per_adapter(stacked, gates)  # (targets, adapters)
    return {
        "accuracy": result["accuracy"],
        "seconds": time.perf_counter() - start,
        "parameters": record["parameters"]["total"],
        "loss": record["loss"],
        "mean_gate_per_adapter": dict(zip(OLD_TASKS, gate_values.mean(0).round(3).tolist())),
    }


def run_train(args, config, model, base, work: str) -> dict:
    start = time.perf_counter()
    result = training.train_and_evaluate(config, work)
    parts = run_config.resolve(config)
    head = heads.build(parts.head, parts.task, model.width)
    params = training.init_params(
        parts.lora, parts.train.mode, model, head, base, jax.random.key(0)
    )
    trained = [
        x for path, x in jax.tree_util.tree_leaves_with_path(params) if "scale" not in str(path)
    ]
    return {
        "accuracy": result["accuracy"],
        "seconds": time.perf_counter() - start,
        "parameters": int(sum(x.size for x in trained)),
    }


def table(records: list[dict]) -> str:
    """Mean ± std over draws of accuracy, seconds and parameters per k and method."""
    lines = [
        "| examples per class | method | test accuracy | seconds | parameters trained | draws |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["shots"] or 10**9, r["method"]) for r in records})
    for shots, method in keys:
        chosen = [r for r in records if (r["shots"] or 10**9) == shots and r["method"] == method]
        acc = np.array([r["accuracy"] for r in chosen])
        sec = np.array([r["seconds"] for r in chosen])
        label = "all (128)" if shots == 10**9 else str(shots)
        lines.append(
            f"| {label} | {method} | {acc.mean():.3f} ± {acc.std():.3f} | {sec.mean():.0f} | "
            f"{chosen[0]['parameters']:,} | {len(chosen)} |"
        )
    return "\n".join(lines)


def main():
    args = ARGS.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    root = os.path.join(args.workdir, "photos")
    write_photos(root)
    out_path = os.path.join(args.workdir, "new_task.jsonl")
    done = {(r["shots"], r["seed"], r["method"]) for r in study.read_jsonl(out_path)}
    runs = [runs_lib.load(os.path.join(args.adapters, t)) for t in OLD_TASKS]
    model, base = runs_lib.base_of(runs)
    stacked = fuse.stack_runs(runs)
    methods = args.methods.split(",")
    jobs = [  # draw by draw, so that a stopped run has every k of the first draws
        (int(k), int(s), m)
        for s in args.seeds.split(",")
        for k in args.shots.split(",")
        for m in methods
    ]
    bar = logs.progress(total=len(jobs), desc="new_task", unit="run")
    for shots, seed, method in jobs:
        bar.update(1)
        if (shots, seed, method) in done:
            continue
        name = f"newphotos-k{shots}-s{seed}"
        folder = os.path.join(args.workdir, "folders", name)
        if not os.path.isdir(folder):
            write_subset(root, folder, shots, seed)
        work = os.path.join(args.workdir, "runs", name)
        if method == "compose":
            config = task_config(args, folder, name, "lora", seed)
            result = run_compose(args, config, model, base, stacked, seed)
        else:
            config = task_config(args, folder, name, method, seed)
            result = run_train(args, config, model, base, work)
        record = {"shots": shots, "seed": seed, "method": method, "steps": args.steps, **result}
        with open(out_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logs.info(f"k={shots} seed={seed} {method}: {result['accuracy']:.3f}")
    bar.close()
    summary = table(study.read_jsonl(out_path))
    with open(os.path.join(args.workdir, "new_task.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
