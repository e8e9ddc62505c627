"""Input pipeline throughput at 224 px: JPEG decode + random crop + flip + scaling, images/s.

    python benchmarks/input_pipeline.py [--images 512] [--batch 64] [--threads 1,2]
        [--workers 2] [--json]

Builds a real prepared dataset first (the `image_folder` builder at size224: 224x224 JPEG at
quality 95 in array_record, as every paper builder stores its images) from crops of
scikit-image's photographs, then times, in one process with the memory settings of the
commands (`cli.keep_freed_memory`):

  decode        `source[i]` for every index (array_record read + JPEG decode, TFDS's decoder)
  preprocess    `input_pipeline.default_preprocess` in training (random crop with 8 px
                padding, flip, scaling to [-1, 1]) on decoded images
  loader        `loader.train_batches` end to end (batches of --batch, prefetch thread) with
                N threads preparing the examples of a batch (`num_threads=N`, what
                `config.data_threads` sets; 0 there means one per core)
  workers       the same with N worker processes preparing whole batches (`num_workers=N`,
                what `config.data_workers` sets)

and prints images/s for each, with the rate per thread. See
benchmarks/RESULTS.md for the numbers and what an accelerator needs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

ARGS = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
ARGS.add_argument("--images", type=int, default=512, help="images in the fake dataset")
ARGS.add_argument("--batch", type=int, default=64)
ARGS.add_argument("--batches", type=int, default=16, help="timed batches of the loader")
ARGS.add_argument("--threads", default="1,2", help="comma-separated thread counts")
ARGS.add_argument("--workers", default="2", help="comma-separated worker counts ('' for none)")
ARGS.add_argument("--json", action="store_true", help="print one JSON line only")


def make_dataset(directory: str, count: int) -> str:
    """Prepares `count` 224 px JPEG photo crops as image_folder/size224; returns the data_dir."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    from jaxmerge.datasets import prepare

    raw = os.path.join(directory, "raw")
    sources = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = sources[i % len(sources)]
        side = int(rng.integers(160, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        folder = os.path.join(raw, f"class_{i % len(sources)}")
        os.makedirs(folder, exist_ok=True)
        crop = photo[top : top + side, left : left + side]
        Image.fromarray(crop).save(os.path.join(folder, f"{i}.jpg"), quality=95)
    data_dir = os.path.join(directory, "tfds")
    prepare.prepare("image_folder/size224", data_dir, raw)
    return data_dir


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def _time_batches(batches, args) -> float:
    for _ in range(4):  # threads or worker processes started (about 2 s), their first batches out
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    rate = _rate(args.batches * args.batch, time.perf_counter() - start)
    batches.close()
    return rate


def measure(data_dir: str, args) -> dict:
    import functools

    import numpy as np

    from jaxmerge import input_pipeline, tasks
    from jaxmerge.input_pipeline import loader, ops, sources

    source = sources.open_source("image_folder/size224", "train", data_dir)
    task = tasks.Task("bench", "image_folder/size224", "classification", 4)
    n = len(source)
    start = time.perf_counter()
    decoded = [source[i] for i in range(n)]
    decode = _rate(n, time.perf_counter() - start)
    # As `input_pipeline.train_batches` passes it: built in whichever process runs it.
    preprocess = ops.Built(functools.partial(input_pipeline.default_preprocess, task, 224, True, 8))
    start = time.perf_counter()
    for i, example in enumerate(decoded):
        preprocess(example, np.random.default_rng(i))
    results = {
        "images": n,
        "decode_images_per_s": decode,
        "preprocess_images_per_s": _rate(n, time.perf_counter() - start),
        "loader": {},
        "workers": {},
    }
    for threads in [int(t) for t in args.threads.split(",")]:
        batches = loader.train_batches(
            source, preprocess, args.batch, seed=0, num_threads=threads, prefetch=2
        )
        rate = _time_batches(batches, args)
        results["loader"][threads] = {"images_per_s": rate, "per_thread": round(rate / threads, 1)}
    for workers in [int(w) for w in args.workers.split(",") if w]:
        batches = loader.train_batches(
            source, preprocess, args.batch, seed=0, num_workers=workers, prefetch=2
        )
        rate = _time_batches(batches, args)
        results["workers"][workers] = {"images_per_s": rate, "per_worker": round(rate / workers, 1)}
    return results


def main():
    from jaxmerge import cli

    args = ARGS.parse_args()
    cli.keep_freed_memory()  # as every command runs
    with tempfile.TemporaryDirectory() as directory:
        data_dir = make_dataset(directory, args.images)
        results = {"cpu_count": os.cpu_count(), "batch": args.batch, **measure(data_dir, args)}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['images']} JPEG images at 224 px, {results['cpu_count']} CPUs")
    decode, preprocess = results["decode_images_per_s"], results["preprocess_images_per_s"]
    print(f"  decode (read + JPEG decode), 1 core:  {decode:8.1f} img/s")
    print(f"  crop + flip + scale, 1 core:          {preprocess:8.1f} img/s")
    for threads, r in results["loader"].items():
        print(
            f"  loader, {threads} thread(s):             {r['images_per_s']:8.1f} img/s "
            f"({r['per_thread']:.1f} per thread)"
        )
    for workers, r in results["workers"].items():
        print(
            f"  loader, {workers} worker process(es):  {r['images_per_s']:8.1f} img/s "
            f"({r['per_worker']:.1f} per worker)"
        )


if __name__ == "__main__":
    main()
