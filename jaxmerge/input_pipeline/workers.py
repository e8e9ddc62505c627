"""Worker processes that prepare whole batches in shared memory: preprocessing past one core.

Threads share one interpreter lock: at 224 px two threads prepared only 1.1x to 1.3x the images
of one on 2 cores (benchmarks/RESULTS.md), since PIL's header parsing, TFDS's example parser
and the op chain run Python per example. Processes do not share it.

`prepared_batches` spawns N workers. Each unpickles its own copy of the source and the
preprocess function (`loader.prepared_examples` bound to them) once, then prepares the batches
it is given, writing each into one slot of a ring of shared-memory blocks. The main process
decides what every batch holds (the same indices and augmentation keys as the in-process
loader), hands batch s to whichever worker is free, and copies the batches out in step order.
So a batch does not depend on the number of workers, nor on whether workers prepare it at all
(tests/test_input_pipeline.py).

Workers are spawned, never forked: a fork of a process running JAX's threads can deadlock.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import traceback
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing import shared_memory

import numpy as np

# How long a process waits on the other before checking that it is still alive.
_POLL_SECONDS = 1.0


class Layout:
    """Where each feature of a batch lies in a slot: {name: (shape, dtype, byte offset)}."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.fields, offset = {}, 0
        for name, value in batch.items():
            self.fields[name] = (value.shape, value.dtype, offset)
            offset += -(-value.nbytes // 64) * 64  # each field starts on a cache line
        self.nbytes = max(offset, 1)

    def views(self, buffer) -> dict[str, np.ndarray]:
        """Arrays over `buffer` (a slot), one per feature."""
        return {
            name: np.ndarray(shape, dtype, buffer=buffer, offset=offset)
            for name, (shape, dtype, offset) in self.fields.items()
        }


def _worker(payload: bytes, slot_names: list[str], layout: Layout, jobs, done):
    """A worker's loop: (slot, step, indices, keys) jobs in, (slot, step, error) reports out."""
    prepare_examples = pickle.loads(payload)
    blocks = [shared_memory.SharedMemory(name=name) for name in slot_names]
    slots = [layout.views(block.buf) for block in blocks]
    parent = multiprocessing.parent_process()
    try:
        while True:
            try:
                job = jobs.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # the main process was killed: nothing will ever read a batch
                continue
            if job is None:
                return
            slot, step, indices, keys = job
            try:
                for row, prepared in enumerate(prepare_examples(indices, keys)):
                    for name, array in slots[slot].items():
                        array[row] = prepared[name]
                done.put((slot, step, None))
            except BaseException:  # handed to the main process, which raises it
                done.put((slot, step, traceback.format_exc()))
    finally:
        slots.clear()  # the views must go before their blocks close
        for block in blocks:
            block.close()


def _shut_down(processes, jobs, blocks):
    # Names first: an exit that cuts this short still leaves no shared memory behind.
    for block in blocks:
        block.unlink()
    for _ in processes:
        try:
            jobs.put_nowait(None)
        except (ValueError, OSError, queue.Full):
            break
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
            process.join()
    # The blocks stay mapped: at exit this runs beside the thread that may still be copying a
    # batch out of one. The generator closes them itself when it ends.


def workers_that_fit(slot_bytes: int, num_workers: int, folder: str = "/dev/shm") -> int:
    """How many of `num_workers` workers' slots (2 each, `slot_bytes` a slot) fit in the free
    space of `folder`, Linux's shared memory: writing past it would kill the process with
    SIGBUS, not an error, and containers often give it 64 MB. Batches do not depend on the
    number of workers, so fewer (with a warning) is safe; none fitting is a one-line
    ValueError."""
    try:
        stats = os.statvfs(folder)
    except OSError:  # no such folder (not Linux): the system places shared memory itself
        return num_workers
    free = stats.f_bavail * stats.f_frsize
    fitting = min(num_workers, free // (2 * slot_bytes))
    if fitting < 1:
        raise ValueError(
            f"data workers need {2 * slot_bytes / 2**20:.0f} MB of shared memory each for "
            f"their batches and {folder} has {free / 2**20:.0f} MB free: use data_workers=0 or "
            "a smaller batch, or give the container more (docker run --shm-size=2g)"
        )
    if fitting < num_workers:
        logging.warning(
            "input pipeline: %d of data_workers=%d fit in the %d MB free in %s (%d MB each)",
            fitting,
            num_workers,
            free // 2**20,
            folder,
            2 * slot_bytes // 2**20,
        )
    return int(fitting)


class WorkerError(RuntimeError):
    """A worker process failed to prepare a batch (its traceback is the message)."""


def pickled(prepare_examples) -> bytes:
    """What every worker unpickles: `prepare_examples(indices, keys) -> [example]`; a one-line
    ValueError where it does not pickle."""
    try:
        return pickle.dumps(prepare_examples)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(
            "data workers need a source and a preprocess function that pickle (module-level "
            f"functions or `ops.Built`, not closures or lambdas): {e}; or use 0 workers"
        ) from None


def prepared_batches(
    payload: bytes,
    jobs: Iterator[tuple[Sequence[int], Sequence[tuple[int, int, int]]]],
    first: dict[str, np.ndarray],
    num_workers: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches `stack(prepare_examples(indices, keys))` for each (indices, keys) job, in
    order, prepared by `num_workers` spawned processes from `payload`
    (`pickled(prepare_examples)`). `first`, the batch before the jobs' (prepared by the
    caller), fixes every feature's shape and dtype and is yielded first.
    """
    layout = Layout(first)
    num_workers = workers_that_fit(layout.nbytes, num_workers)
    num_slots = 2 * num_workers  # each worker busy with one batch, one more ready behind it
    yield first
    blocks = [shared_memory.SharedMemory(create=True, size=layout.nbytes) for _ in range(num_slots)]
    context = multiprocessing.get_context("spawn")
    job_queue, done_queue = context.Queue(), context.Queue()
    processes = [
        context.Process(
            target=_worker,
            args=(payload, [b.name for b in blocks], layout, job_queue, done_queue),
            daemon=True,
            name=f"input_pipeline_worker_{i}",
        )
        for i in range(num_workers)
    ]
    for process in processes:
        process.start()
    stop = weakref.finalize(layout, _shut_down, processes, job_queue, blocks)
    slots = [layout.views(block.buf) for block in blocks]
    free, ready, step, next_step = list(range(num_slots)), {}, 0, 0
    try:
        while True:
            while free:  # keep every slot busy
                job = next(jobs, None)
                if job is None:
                    break
                job_queue.put((free.pop(), next_step, *job))
                next_step += 1
            if step == next_step:
                return
            while step not in ready:
                try:
                    slot, done_step, error = done_queue.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if not all(p.is_alive() for p in processes):
                        raise WorkerError("an input pipeline worker process died") from None
                    continue
                if error is not None:
                    raise WorkerError(f"preparing batch {done_step} failed:\n{error}")
                ready[done_step] = slot
            slot = ready.pop(step)
            batch = {name: array.copy() for name, array in slots[slot].items()}
            free.append(slot)
            step += 1
            yield batch
    finally:
        slots.clear()  # the views must go before their blocks close
        stop()
        for block in blocks:
            block.close()
