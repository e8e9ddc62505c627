"""The CLIP suite: its tasks and GTSRB builder, and a dry run of experiments/configs/clip.py at
full model size (CLIP ViT-B/32 at 224, random weights) on a few fake images per dataset.

Fake data: GTSRB from files in its official download layout, through the real builder; the
seven TFDS datasets as TFDS's own builders (their features, names and splits) prepared as
array_record from a few random images each, since their downloads cannot be faked offline.

Measured: the dry run of MNIST and GTSRB took 250 s on 2 CPU cores shared with other jobs
(8 XLA devices, batch 8): about 20 s per ViT-B/32 training run, most of it compiling, and 70 s
for the four merges (AdaMerging's 2 steps included). All eight tasks would take about 15 min.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import registered

from experiments import study
from experiments.configs import clip as clip_config
from jaxmerge import (
    config_lib,
    input_pipeline,
    lora,
    recipes,
    run_config,
    scoring,
    tasks,
    training,
    zero_shot,
)
from jaxmerge import runs as runs_lib
from jaxmerge.datasets import BUILDERS, common, gtsrb
from jaxmerge.models import clip
from jaxmerge.tasks import clip_suite

# Images per split of each fake dataset; EuroSAT and RESISC45 are split 80/20 from `train`.
FAKE_EXAMPLES = {"train": 10, "validation": 4, "test": 4, "extra": 2}


def fake_gtsrb_download(manual_dir, rng, per_split: int = 4) -> None:
    """A few .ppm images in the layout of the three official GTSRB zips."""
    root = manual_dir / "GTSRB"
    for i in range(per_split):
        folder = root / "Final_Training" / "Images" / f"{i % 3:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = int(rng.integers(20, 60))
        image = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"00000_{i:05d}.ppm")
    test = root / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(per_split):
        Image.fromarray(rng.integers(0, 255, (30, 31, 3), dtype=np.uint8)).save(
            test / f"{i:05d}.ppm"
        )
        rows.append(f"{i:05d}.ppm;31;30;5;5;25;25;{(i * 7) % 43}")
    (manual_dir / gtsrb.TEST_LABELS).write_text("\n".join(rows) + "\n")


def _fake_value(feature, rng):
    if isinstance(feature, tfds.features.Image):
        height, width, channels = (s or 32 for s in feature.shape)
        image = rng.integers(0, 255, (height, width, channels), dtype=np.uint8)
        return common.encode(image, feature.encoding_format or "png")
    if isinstance(feature, tfds.features.ClassLabel):
        return int(rng.integers(feature.num_classes))
    if isinstance(feature, tfds.features.BBoxFeature):
        return tfds.features.BBox(0.1, 0.1, 0.9, 0.9)
    if isinstance(feature, tfds.features.Text):
        return "fake"
    return np.zeros(feature.shape, feature.np_dtype)


def fake_prepare_tfds(name: str, data_dir: str, rng) -> None:
    """Prepares TFDS's own builder `name` as array_record from random examples of its features."""
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    splits = [s for s in FAKE_EXAMPLES if s in builder.info.splits] or ["train", "test"]

    def examples(split):
        for i in range(FAKE_EXAMPLES.get(split, 4)):
            yield f"{split}_{i}", {k: _fake_value(f, rng) for k, f in features.items()}

    builder._split_generators = lambda dl_manager: {s: examples(s) for s in splits}
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir),
    )


def test_suite_tasks_and_their_datasets():
    assert list(clip_suite.TASKS) == [
        "sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"
    ]  # fmt: skip
    for name in clip_suite.TASKS:
        task = tasks.get(name)
        builder = task.dataset.split("/")[0]
        assert builder in BUILDERS or builder in registered.list_imported_builders(), name
        assert task.suite == "clip" and task.preprocess is None and not task.flip
    # The pixel normalisation is the base family's: CLIP's statistics on a CLIP base, [-1, 1]
    # on SigLIP (its checkpoints' preprocessing) and ViT.
    example = {"image": np.full((10, 12, 1), 255, np.uint8), "label": 3}
    for family, mean, std in [
        ("clip", clip.CLIP_MEAN, clip.CLIP_STD), ("siglip", (0.5,), (0.5,)), ("vit", (0.5,), (0.5,))
    ]:  # fmt: skip
        config = config_lib.base_config()
        config.model.family = family
        normalization = run_config.data_settings(config).normalization
        prepare = input_pipeline.preprocess(tasks.get("mnist"), 8, True, **normalization)
        out = prepare(dict(example), np.random.default_rng(0))
        want = np.broadcast_to((1 - np.asarray(mean)) / np.asarray(std), (3,))
        np.testing.assert_allclose(out["image"][0, 0], want, 1e-6)


def test_gtsrb_builder_reads_the_official_layout(tmp_path):
    from jaxmerge.datasets import prepare
    from jaxmerge.input_pipeline import sources

    fake_gtsrb_download(tmp_path / "manual", np.random.default_rng(0))
    prepare.prepare("gtsrb/size32", str(tmp_path / "data"), str(tmp_path / "manual"))
    test = sources.open_source("gtsrb/size32", "test", str(tmp_path / "data"))
    labels = sorted(int(test[i]["label"]) for i in range(len(test)))
    assert labels == sorted((i * 7) % 43 for i in range(4))
    assert test[0]["image"].shape == (32, 32, 3)
    (tmp_path / "manual" / gtsrb.TEST_LABELS).unlink()
    with pytest.raises(ValueError, match="GTSRB_Final_Test_GT.zip"):
        prepare.prepare("gtsrb/size64", str(tmp_path / "data"), str(tmp_path / "manual"))


# The dry run's tasks: MNIST (a TFDS builder) and GTSRB (jaxmerge's, from its download layout)
# keep CI within a few minutes (each run compiles ViT-B/32); JAXMERGE_CLIP_DRY_RUN_TASKS=all
# (or a '+'-joined list) runs more.
DRY_RUN_TASKS = os.environ.get("JAXMERGE_CLIP_DRY_RUN_TASKS", "mnist+gtsrb").replace(
    "all", "+".join(clip_suite.TASKS)
)


def random_zero_shot_file(path, task_names, width: int = 768, embed: int = 512) -> str:
    """A heads file of `jaxmerge.text_heads`'s format for a random CLIP B/32: unit class
    embeddings, a random image projection (a random base has no text tower to embed with)."""
    rng = np.random.default_rng(1)
    arrays = {
        "scale": np.float32(100.0),
        "visual_projection": rng.normal(0, width**-0.5, (width, embed)).astype(np.float32),
        "model": np.asarray("random"),
    }
    for name in task_names:
        classes = rng.normal(size=(tasks.get(name).outputs, embed)).astype(np.float32)
        arrays[f"{name}/classes"] = classes / np.linalg.norm(classes, axis=1, keepdims=True)
        arrays[f"{name}/class_names"] = np.asarray([f"class {i}" for i in range(len(classes))])
        arrays[f"templates/{name}"] = np.asarray(["a photo of a {}."])
    np.savez(path, **arrays)
    return str(path)


def rescore(config, workdir: str, record: dict) -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "loss"}} of a merge record, recomputed without the study's scorer:
    the runs merged again by the record's method, folded into the base and applied to every
    image of each task's test split in one batch, through that task's own head."""
    seed_dir = study.seed_dir(workdir, record["seed"])
    runs = [runs_lib.load(training.run_dir(seed_dir, "lora", t)) for t in record["tasks"]]
    model_def, base = runs_lib.base_of(runs)
    weights = [config.merge_weight] * len(runs)
    params = config.methods[record["method"]].to_dict()
    merged, _ = recipes.merge_runs(runs, model_def, base, record["method"], weights, params)
    backbone = lora.fold_into_base(base, merged)
    scores = {}
    for run in runs:
        source = input_pipeline.open_split(run.task, run.task.eval_split, run.parts.data)
        prepare = input_pipeline.preprocess(
            run.task, model_def.image_size, False, **run.parts.data.normalization
        )
        rng = np.random.default_rng(0)
        examples = [prepare(dict(source[i]), rng) for i in range(len(source))]
        images = np.stack([e["image"] for e in examples])
        labels = np.array([e["label"] for e in examples])
        params = {"base": backbone, "head": run.head}
        logits = scoring.forward(model_def, run.head_def, params, None, images, False)
        logits = np.asarray(logits, np.float64)
        top = logits.max(-1)
        cross_entropy = top + np.log(np.exp(logits - top[:, None]).sum(-1))
        cross_entropy -= logits[np.arange(len(labels)), labels]
        scores[run.task.name] = {
            "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
            "loss": float(np.mean(cross_entropy)),
        }
    return scores


@pytest.mark.full_size
@pytest.mark.parametrize("heads", ["linear", "zero_shot"])
def test_clip_suite_dry_run_at_full_size(tmp_path, heads):
    """The suite's config at ViT-B/32, 224 px, with trained linear heads and with frozen
    zero-shot heads (the published tables' setting): 2 training steps per run, every merge
    method of the config on all the tasks at once, scoring and the report."""
    rng = np.random.default_rng(0)
    data_dir, manual_dir = tmp_path / "tfds", tmp_path / "manual"
    arg = f"base=random,steps=2,tasks={DRY_RUN_TASKS}"
    if heads == "zero_shot":
        heads_file = random_zero_shot_file(tmp_path / "zs.npz", DRY_RUN_TASKS.split("+"))
        arg += f",heads=zero_shot,zero_shot_file={heads_file}"
    config = clip_config.get_config(arg)
    for name in config.tasks:
        dataset = tasks.get(name).dataset
        if dataset.split("/")[0] == "gtsrb":
            fake_gtsrb_download(manual_dir, rng)
        else:
            fake_prepare_tfds(dataset, str(data_dir), rng)
    t = config.train
    t.data_dir, t.manual_dir = str(data_dir), str(manual_dir)
    t.model.dtype = "float32"  # bfloat16 matmuls are slower than float32 on CPU
    t.batch_size, t.eval_batch_size = 8, 8
    t.warmup_steps, t.log_every, t.checkpoint_every = 0, 2, 2
    t.tensorboard = False
    config.methods.adamerging = {"steps": 2, "images": 4, "batch_size": 4}
    config.methods.wudi = {"steps": 2}
    for name in ("regmean", "regmean_plusplus"):
        config.methods[name] = {"images": 4, "batch_size": 4}
    config.fusion = {gating: {"steps": 2, "images": 4, "batch_size": 1} for gating in config.fusion}
    start = time.perf_counter()
    paths = study.run_study(config, str(tmp_path / "workdir"))
    seconds = time.perf_counter() - start
    print(f"CLIP suite dry run, {len(config.tasks)} tasks: {seconds:.0f} s")
    merges = study.read_jsonl(str(tmp_path / "workdir" / "merges.jsonl"))
    fused = [f"fused_{gating}" for gating in config.fusion]
    assert sorted(r["method"] for r in merges) == sorted([*config.methods, *fused])
    for record in merges:
        assert set(record["scores"]) == set(config.tasks)
        for score in record["scores"].values():  # the whole fake test split: k right of 4
            assert score["examples"] == FAKE_EXAMPLES["test"] == 4
            assert score["accuracy"] * 4 == pytest.approx(round(score["accuracy"] * 4), abs=1e-6)
    # On random weights and images the accuracy is chance: the main method's merge is scored
    # again outside the study instead, and must give the same accuracy and loss.
    main = next(r for r in merges if r["method"] == config.main_method)
    again = rescore(config, str(tmp_path / "workdir"), main)
    for name, score in main["scores"].items():
        assert again[name]["accuracy"] == pytest.approx(score["accuracy"], abs=1e-6), name
        assert again[name]["loss"] == pytest.approx(score["loss"], rel=1e-4), name
    assert os.path.exists(paths["main_table"])
    if heads == "zero_shot":  # every adapter trained under the file's frozen head
        for name in config.tasks:
            run = runs_lib.load(str(tmp_path / "workdir" / "seed_0" / "adapters" / name))
            file_head = zero_shot.head_params(config.train.head.zero_shot_file, name)
            for key, value in file_head.items():
                np.testing.assert_array_equal(run.head[key], value)
