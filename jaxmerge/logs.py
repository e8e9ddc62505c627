"""What a run shows and writes for people, from process 0 only on multi-host runs.

Every process of a multi-host run executes the same program; only process 0
(`jax.process_index() == 0`) writes the human-readable files (`metrics.jsonl`, `result.json`,
TensorBoard events, the study's caches and report) and draws progress bars, so a shared
filesystem gets one copy and a terminal one bar. The other processes log through absl.
Checkpoints are not gated here: Orbax coordinates multi-host saves itself.

    bar = logs.progress(total=steps, desc="lora:digits", unit="step")
    logs.append_jsonl(path, {"step": 10, "loss": 0.5})
    scalars = logs.Scalars(os.path.join(run_dir, "tensorboard"), enabled=config.tensorboard)
"""

from __future__ import annotations

import functools
import json
import numbers
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
from absl import logging
from tqdm import tqdm

# Seconds between progress lines when stderr is not a terminal (a log file or a CI console):
# tqdm's redraws would otherwise fill it with carriage returns.
LINE_INTERVAL_S = 60.0


def is_writer() -> bool:
    """True on the process that writes files and draws bars (process 0; the only one locally)."""
    return jax.process_index() == 0


def info(message: str) -> None:
    """A line for the user: printed on process 0, absl-logged (INFO) on the others."""
    if is_writer():
        print(message)
    else:
        logging.info("[process %d] %s", jax.process_index(), message)


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Appends `record` as one JSON line to `path`, on process 0 only (flushed: a kill loses
    at most the line being written)."""
    if not is_writer():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class LineProgress:
    """The subset of tqdm the loops use, writing one line every `interval` seconds and at close.

    `emit` receives each line: `print` to stderr on process 0 without a terminal, absl logging
    on the other processes.
    """

    def __init__(
        self,
        iterable=None,
        *,
        total=None,
        desc="",
        unit="it",
        initial=0,
        emit=None,
        interval=LINE_INTERVAL_S,
    ):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.n = desc, unit, initial
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.interval, self.postfix, self.closed = interval, "", False
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:  # the final line once, however often a loop's exits close it
            self.closed = True
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        total = f"/{self.total}" if self.total is not None else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        elapsed = self.last - self.start
        self.emit(f"{self.desc}: {self.n}{total} {self.unit}{postfix} ({elapsed:.0f} s)")


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm | LineProgress:
    """A progress bar over `iterable` (or of `total=` steps, advanced with `update`).

    tqdm on process 0 when stderr is a terminal; a `LineProgress` printing a line a minute
    when it is not (logs stay readable); absl-logged lines on the other processes.
    """
    if not is_writer():
        emit = lambda line: logging.info("[process %d] %s", jax.process_index(), line)
        return LineProgress(iterable, emit=emit, **kwargs)
    if not sys.stderr.isatty():
        return LineProgress(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


@functools.cache
def _summary_writer_class():
    """tensorboardX's SummaryWriter, or None (said once per process) when it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        info(
            "note: tensorboardX is not installed, so no TensorBoard event files are written "
            "(pip install tensorboardX, or --config.tensorboard=false to silence this)"
        )
        return None
    return SummaryWriter


class Scalars:
    """TensorBoard scalars beside a run's metrics.jsonl (which stays the record).

    Writes nothing (and imports nothing) unless `enabled`, on process 0, with tensorboardX
    installed. `purge_step`: on a resume, events at this step and later, logged by the
    interrupted run and about to be logged again, are hidden by TensorBoard.
    """

    def __init__(self, directory: str, *, enabled: bool, purge_step: int | None = None):
        writer_class = _summary_writer_class() if enabled and is_writer() else None
        self.writer = writer_class(directory, purge_step=purge_step) if writer_class else None

    def write(self, prefix: str, record: Mapping[str, Any], step: int) -> None:
        """Every number of `record` (but `step`) as scalar `<prefix>/<key>` at `step`."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as error:  # a full disk: the JSONL record matters, not its mirror
            logging.warning("TensorBoard events not flushed: %s", error)
        self.writer = None
