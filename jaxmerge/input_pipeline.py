"""TF-free input pipeline: random-access sources -> preprocessed numpy batches, resumable.

A *source* is anything with `__len__` and `__getitem__(int) -> dict` (a `tfds.data_source`
split, a list of dicts). A *preprocess* function maps `(example, rng) -> example`, with `rng` a
`numpy.random.Generator` seeded from (seed, epoch, example index), so augmentation is a pure
function of those keys; `compose` chains them.

Training order: the stream is the concatenation of one permutation of the source per epoch,
`epoch_permutation(N, seed, e)`, and global step s holds stream positions [s * B, (s + 1) * B).
A run restarted with `start_step=s` therefore yields exactly the batches (and augmentations)
an uninterrupted run yields from step s on. Host h of P reads only positions
[h * B / P, (h + 1) * B / P) of each global batch.

Landmarks (`landmarks`, float (K, 2) of (x, y) in [0, 1] of the image width and height, 0 at
the left/top edge, 1 at the right/bottom edge) follow every geometric op. A horizontal flip maps
x -> 1 - x *and* must swap left and right points, so `random_flip` needs the dataset's flip
permutation for landmark examples (WFLW: `jaxmerge.datasets.wflw.FLIP_PERMUTATION`); without one
it refuses landmark examples: leave the flip out of landmark tasks, or pass the permutation.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

Example = dict[str, Any]
Preprocess = Callable[[Example, np.random.Generator], Example]


class Source(Protocol):
    """Random access to examples: what `tfds.data_source` returns."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


# ---------------------------------------------------------------------------------------------
# Preprocessing: small pure functions of (example, rng), composed.


def compose(*fns: Preprocess) -> Preprocess:
    """`compose(f, g)(ex, rng) = g(f(ex, rng), rng)`: applies the functions left to right."""

    def composed(example: Example, rng: np.random.Generator) -> Example:
        for fn in fns:
            example = fn(example, rng)
        return example

    return composed


def _with_image(example: Example, image: np.ndarray, **updates) -> Example:
    return {**example, "image": image, **updates}


def keep(*keys: str) -> Preprocess:
    """Drops every feature but `keys` (e.g. text fields that cannot be batched)."""

    def fn(example, rng):
        missing = [k for k in keys if k not in example]
        if missing:
            raise ValueError(f"keep: keys {missing} not in example keys {sorted(example)}")
        return {k: example[k] for k in keys}

    return fn


def resize(height: int, width: int | None = None) -> Preprocess:
    """Resizes the uint8 `image` to (height, width) with antialiased bilinear interpolation.

    Landmarks are relative to the image, so they are unchanged.
    """
    width = height if width is None else width

    def fn(example, rng):
        image = np.asarray(example["image"])
        if image.dtype != np.uint8:
            raise ValueError(
                f"resize: image dtype must be uint8 (resize before normalising), got {image.dtype}"
            )
        if image.shape[:2] == (height, width):
            return example
        size, method = (width, height), Image.Resampling.BILINEAR
        if image.shape[-1] == 3:  # one PIL call for RGB; other channel counts one by one
            return _with_image(example, np.asarray(Image.fromarray(image).resize(size, method)))
        channels = [
            Image.fromarray(image[..., c]).resize(size, method) for c in range(image.shape[-1])
        ]
        return _with_image(example, np.stack([np.asarray(c) for c in channels], axis=-1))

    return fn


def to_rgb() -> Preprocess:
    """Grey (H, W, 1) -> (H, W, 3) by repeating the channel; 3-channel images pass through."""

    def fn(example, rng):
        image = np.asarray(example["image"])
        if image.shape[-1] == 3:
            return example
        if image.shape[-1] != 1:
            raise ValueError(f"to_rgb: image must have 1 or 3 channels, got shape {image.shape}")
        return _with_image(example, np.repeat(image, 3, axis=-1))

    return fn


def to_grayscale() -> Preprocess:
    """(H, W, 3) -> (H, W, 1) with ITU-R 601 luma `0.299 R + 0.587 G + 0.114 B` (dtype kept)."""

    def fn(example, rng):
        image = np.asarray(example["image"])
        if image.shape[-1] == 1:
            return example
        if image.shape[-1] != 3:
            raise ValueError(f"to_grayscale: image must have 1 or 3 channels, got {image.shape}")
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if image.dtype == np.uint8:
            grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return _with_image(example, grey[..., None])

    return fn


def normalize(mean: Sequence[float], std: Sequence[float]) -> Preprocess:
    """uint8 image -> float32 `(image / 255 - mean) / std`, per channel."""
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if np.any(std32 <= 0):
        raise ValueError(f"normalize: std must be > 0, got {list(std)}")

    def fn(example, rng):
        image = np.asarray(example["image"], np.float32) / 255.0
        return _with_image(example, (image - mean32) / std32)

    return fn


def normalize_to_minus_one_one() -> Preprocess:
    """uint8 image -> float32 `image / 127.5 - 1` in [-1, 1] (the ViT / big_vision convention)."""
    return normalize(mean=(0.5,), std=(0.5,))


def random_crop(padding: int) -> Preprocess:
    """Pads `padding` zero pixels on every side, then crops the original size at a random spot.

    A crop offset (dy, dx) in [0, 2 * padding] moves content by (padding - dy, padding - dx)
    pixels, so landmarks move by `x += (padding - dx) / W`, `y += (padding - dy) / H`.
    """
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")

    def fn(example, rng):
        image = np.asarray(example["image"])
        height, width = image.shape[:2]
        dy, dx = rng.integers(0, 2 * padding + 1, size=2)
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        out = _with_image(example, padded[dy : dy + height, dx : dx + width])
        if "landmarks" in example:
            shift = np.array([(padding - dx) / width, (padding - dy) / height], np.float32)
            out["landmarks"] = np.asarray(example["landmarks"], np.float32) + shift
        return out

    return fn


def flip_horizontally(example: Example, landmark_permutation: np.ndarray | None) -> Example:
    """Mirrors the image left-right; landmarks become `1 - x` then reorder by the permutation.

    `flipped_landmarks[i] = mirror(landmarks[landmark_permutation[i]])`.
    """
    out = _with_image(example, np.asarray(example["image"])[:, ::-1])
    if "landmarks" in example:
        if landmark_permutation is None:
            raise ValueError(
                "random_flip: example has landmarks but landmark_permutation is None; pass the "
                "dataset's flip permutation (e.g. wflw.FLIP_PERMUTATION) or do not flip"
            )
        points = np.asarray(example["landmarks"], np.float32)[landmark_permutation]
        out["landmarks"] = np.stack([1.0 - points[:, 0], points[:, 1]], axis=1)
    return out


def random_flip(landmark_permutation: Sequence[int] | None = None) -> Preprocess:
    """Horizontal flip with probability 1/2 (see `flip_horizontally` for landmarks)."""
    perm = None if landmark_permutation is None else np.asarray(landmark_permutation)
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise ValueError("random_flip: landmark_permutation must be a permutation of 0..K-1")

    def fn(example, rng):
        return flip_horizontally(example, perm) if rng.random() < 0.5 else example

    return fn


# ---------------------------------------------------------------------------------------------
# Batching.


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one example in one epoch: `default_rng([seed, epoch, i])`."""
    return np.random.default_rng([seed, epoch, index])


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: `default_rng([seed, epoch, 2**32 - 1]).permutation(N)`.

    The trailing constant keeps this stream apart from every `example_rng`.
    """
    return np.random.default_rng([seed, epoch, 2**32 - 1]).permutation(num_examples)


def stack_examples(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """[{k: v}] -> {k: np.stack(v)} (python scalars become numpy arrays)."""
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


def _read(source: Source, indices: Sequence[int]) -> list[Example]:
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:  # array_record sources read a list in one call
        return list(getitems([int(i) for i in indices]))
    return [source[int(i)] for i in indices]


def _host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} must be divisible by process_count={process_count}"
        )
    per_host = batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class _Loader:
    """Reads and preprocesses lists of (index, rng key) pairs, optionally on a thread pool."""

    def __init__(self, source: Source, preprocess: Preprocess, num_threads: int):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.source, self.preprocess = source, preprocess
        self.pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def load(self, indices: Sequence[int], rng_keys: Sequence[tuple[int, int, int]]):
        examples = _read(self.source, indices)
        work = lambda ex_key: self.preprocess(ex_key[0], example_rng(*ex_key[1]))
        pairs = list(zip(examples, rng_keys))
        return list(self.pool.map(work, pairs)) if self.pool else [work(p) for p in pairs]


def train_positions(
    num_examples: int, seed: int, step: int, global_batch_size: int, host: slice
) -> tuple[np.ndarray, np.ndarray]:
    """(source indices, epochs) of this host's part of global batch `step`."""
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size)[host]
    epochs = positions // num_examples
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        indices[chosen] = epoch_permutation(num_examples, seed, int(epoch))[
            positions[chosen] % num_examples
        ]
    return indices, epochs


_END = object()


def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event):
    # A free function: the thread must not hold the Prefetcher, or it would never be collected.
    try:
        for item in items:
            if not _put(out, stop, item):
                return
        _put(out, stop, _END)
    except BaseException as e:  # handed to the consumer, raised by __next__
        _put(out, stop, e)


class Prefetcher:
    """Iterates `items` on a daemon thread, at most `size` items ahead; re-raises its errors.

    The thread starts at construction, so the first batch is being prepared while the caller
    sets up. `close()` (also on garbage collection) stops it at its next hand-over.
    """

    def __init__(self, items: Iterator, size: int):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(items, self._queue, self._stop),
            daemon=True,
            name="input_pipeline_prefetch",
        )
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            self.close()
            raise item
        return item

    def close(self):
        """Stops the background thread."""
        self._stop.set()

    def __del__(self):
        self._stop.set()


def _maybe_prefetch(items: Iterator, size: int) -> Iterator:
    return Prefetcher(items, size) if size > 0 else items


def train_batches(
    source: Source,
    preprocess: Preprocess,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator over this host's slices of the training batches from `start_step` on.

    Args:
      source: random-access examples (`len(source)` of them).
      preprocess: `(example, rng) -> example`, e.g. `compose(resize(224), random_flip(), ...)`.
      global_batch_size: B, examples per step over all hosts; divisible by process_count.
      seed: fixes every epoch's order and every augmentation.
      start_step: first step to yield (a resumed run passes the step it stopped at).
      process_index, process_count: this host's index and the number of hosts.
      prefetch: batches prepared ahead on a background thread (0: no thread).
      num_threads: threads preprocessing the examples of one batch.

    Returns:
      An iterator of dicts of arrays with leading dimension B / process_count; batch s holds
      stream positions [s * B, (s + 1) * B) of the epoch-by-epoch permuted stream.
    """
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("train_batches: source is empty")
    if global_batch_size < 1 or start_step < 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be >= 1, start_step={start_step} >= 0"
        )
    host = _host_slice(global_batch_size, process_index, process_count)
    loader = _Loader(source, preprocess, num_threads)

    def generate():
        step = start_step
        while True:
            indices, epochs = train_positions(num_examples, seed, step, global_batch_size, host)
            keys = [(seed, int(e), int(i)) for e, i in zip(epochs, indices)]
            yield stack_examples(loader.load(indices, keys))
            step += 1

    return _maybe_prefetch(generate(), prefetch)


def num_eval_steps(num_examples: int, batch_size: int) -> int:
    """ceil(N / B): the steps `eval_batches` takes to cover N examples with global batch B."""
    return -(-num_examples // batch_size)


def eval_batches(
    source: Source,
    preprocess: Preprocess,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    num_threads: int = 1,
    seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator covering every example exactly once, in source order, with a `mask`.

    Every host takes `num_eval_steps(N, batch_size)` steps; global batch s holds positions
    [s * B, (s + 1) * B) and this host its slice of them. Positions >= N are padding: a copy of
    example N - 1 with `mask` False; real examples have `mask` True.
    """
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("eval_batches: source is empty")
    if batch_size < 1:
        raise ValueError(f"eval_batches: batch_size must be >= 1, got {batch_size}")
    host = _host_slice(batch_size, process_index, process_count)
    loader = _Loader(source, preprocess, num_threads)

    def generate():
        for step in range(num_eval_steps(num_examples, batch_size)):
            positions = np.arange(step * batch_size, (step + 1) * batch_size)[host]
            mask = positions < num_examples
            indices = np.minimum(positions, num_examples - 1)
            keys = [(seed, 0, int(i)) for i in indices]
            batch = stack_examples(loader.load(indices, keys))
            batch["mask"] = mask
            yield batch

    return _maybe_prefetch(generate(), prefetch)


# ---------------------------------------------------------------------------------------------
# TFDS.


def open_source(name: str, split: str, data_dir: str | None = None) -> Source:
    """`tfds.data_source(name, split, data_dir)` for a prepared dataset, with clear errors.

    Any TFDS builder prepared as array_record works: jaxmerge's (`jaxmerge.datasets`) and TFDS's
    own. `name` may carry a config and version ("utkface/size64").

    Raises:
      ValueError: naming the dataset, split and data_dir when the name is unknown, the dataset
        is not prepared there, or the split does not exist.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    from jaxmerge.datasets import BUILDERS

    builder_name = name.split("/")[0].split(":")[0]
    known = set(BUILDERS) | set(registered.list_imported_builders())
    if builder_name not in known:
        raise ValueError(
            f"dataset={name!r} is not a registered TFDS builder; jaxmerge's are: "
            f"{', '.join(BUILDERS)}"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    where = data_dir if data_dir is not None else "(TFDS default)"
    if not builder.is_prepared():
        raise ValueError(
            f"dataset {name!r} is not prepared in data_dir={where}; run `python -m "
            f"jaxmerge.datasets.prepare --dataset {builder_name} --data_dir DIR "
            "[--manual_dir DIR]` first"
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"split={split!r} is not in dataset {name!r}; its splits: "
            f"{', '.join(builder.info.splits)}"
        )
    return builder.as_data_source(split=split)
