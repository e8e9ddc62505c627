"""Batches from random-access sources: preprocessed numpy batches, resumable, host-sliced.

A *source* is anything with `__len__` and `__getitem__(int) -> dict` (a `tfds.data_source`
split, a list of dicts); a *preprocess* function is an op of `input_pipeline.ops`.

Training order: the stream is the concatenation of one permutation of the source per epoch,
`epoch_permutation(N, seed, e)`, and global step s holds stream positions [s * B, (s + 1) * B).
A run restarted with `start_step=s` therefore yields exactly the batches (and augmentations)
an uninterrupted run yields from step s on. Host h of P reads only positions
[h * B / P, (h + 1) * B / P) of each global batch.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from jaxmerge.input_pipeline import workers
from jaxmerge.input_pipeline.ops import Example, Preprocess
from jaxmerge.input_pipeline.prefetch import maybe_prefetch


class Source(Protocol):
    """Random access to examples: what `tfds.data_source` returns."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


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


def read_examples(source: Source, indices: Sequence[int]) -> list[Example]:
    """`[source[i] for i in indices]`, in one call where the source reads a list at once."""
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


def prepared_examples(
    source: Source,
    preprocess: Preprocess,
    indices: Sequence[int],
    keys: Sequence[tuple[int, int, int]],
    pool: concurrent.futures.Executor | None = None,
) -> list[Example]:
    """`[preprocess(source[i], example_rng(*key)) ...]`, the examples spread over `pool`'s
    threads where given: a batch's work, in this process or in a worker process."""
    examples = read_examples(source, indices)
    work = lambda pair: preprocess(pair[0], example_rng(*pair[1]))  # noqa: E731
    pairs = zip(examples, keys)
    return list(pool.map(work, pairs)) if pool else [work(pair) for pair in pairs]


class _Loader:
    """Reads and preprocesses lists of (index, rng key) pairs, optionally on a thread pool."""

    def __init__(self, source: Source, preprocess: Preprocess, num_threads: int):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.source, self.preprocess = source, preprocess
        self.pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def load(self, indices: Sequence[int], rng_keys: Sequence[tuple[int, int, int]]):
        return prepared_examples(self.source, self.preprocess, indices, rng_keys, self.pool)


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
    num_workers: int = 0,
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
      num_workers: worker processes preparing whole batches (`workers`; 0: none, the batches
        are prepared in this process by `num_threads` threads). Needs a source and preprocess
        that pickle.

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

    def jobs():
        step = start_step
        while True:
            indices, epochs = train_positions(num_examples, seed, step, global_batch_size, host)
            yield indices, [(seed, int(e), int(i)) for e, i in zip(epochs, indices)]
            step += 1

    batches = _batches(source, preprocess, jobs(), num_threads, num_workers)
    return maybe_prefetch(batches, prefetch)


def _batches(source, preprocess, jobs, num_threads: int, num_workers: int):
    """The stacked batch of each (indices, keys) job, prepared in this process by
    `num_threads` threads, or by `num_workers` worker processes."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    prepare_examples = functools.partial(prepared_examples, source, preprocess)
    payload = workers.pickled(prepare_examples) if num_workers else None
    loader = _Loader(source, preprocess, num_threads)
    prepare = lambda job: stack_examples(loader.load(*job))
    if not num_workers:
        return map(prepare, jobs)

    def in_workers():
        # The first batch, prepared here, gives the workers every feature's shape and dtype.
        first = next(jobs, None)
        if first is not None:
            yield from workers.prepared_batches(payload, jobs, prepare(first), num_workers)

    return in_workers()


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
    num_workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator covering every example exactly once, in source order, with a `mask`.

    Every host takes `num_eval_steps(N, batch_size)` steps; global batch s holds positions
    [s * B, (s + 1) * B) and this host its slice of them. Positions >= N are padding: a copy of
    example N - 1 with `mask` False; real examples have `mask` True. `num_threads` and
    `num_workers` as in `train_batches`.
    """
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("eval_batches: source is empty")
    if batch_size < 1:
        raise ValueError(f"eval_batches: batch_size must be >= 1, got {batch_size}")
    host = _host_slice(batch_size, process_index, process_count)
    steps = [
        np.arange(step * batch_size, (step + 1) * batch_size)[host]
        for step in range(num_eval_steps(num_examples, batch_size))
    ]
    indices = [np.minimum(positions, num_examples - 1) for positions in steps]
    jobs = ((i, [(seed, 0, int(j)) for j in i]) for i in indices)
    batches = _batches(source, preprocess, jobs, num_threads, num_workers)
    # Positions >= N are padding; the mask is known before any image is read.
    masked = (
        {**batch, "mask": positions < num_examples} for batch, positions in zip(batches, steps)
    )
    return maybe_prefetch(masked, prefetch)
