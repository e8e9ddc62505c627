"""Stderr put aside while Orbax saves or reads a checkpoint, and a watcher for a process that
dies meanwhile.

    with stderr_aside.aside("save", key=directory) as aside:
        mngr.save(...)
    aside.pass_on()  # success: what was printed goes to stderr, the file is removed

A save that fails on a full disk makes Orbax's writer threads print hundreds of tracebacks;
they belong in a file (named in the one-line error), not before that line. File descriptor 2
(Python, absl and TensorStore's C++ alike) goes into a pipe that a small watcher process copies
into `/tmp/jaxmerge_save_*.log`. The watcher outlives this process: when it dies during the save
(a multi-host peer died and the distributed runtime aborts, exit 134; an out-of-memory kill),
the watcher finds the pipe closed without the end mark and prints the cause and the log's path
on the real stderr, which otherwise gets nothing.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile

PREFIX = "jaxmerge_save_"

# Copies stdin into the log; at EOF without the end mark (argv[3]) the process writing it died:
# the cause is its last fatal line (absl's "F1205 ...", a "Fatal Python error"), else its last
# line. Plain Python without site packages: it starts in 30 ms.
_WATCHER = r"""
import os, re, sys
log_path, what, mark = sys.argv[1], sys.argv[2], sys.argv[3].encode()
tail = b""
with open(log_path, "ab") as log:
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        tail = (tail + chunk)[-(1 << 16):]
if not tail.endswith(mark):
    lines = [l.strip() for l in tail.decode(errors="replace").splitlines() if l.strip()]
    fatal = [l for l in lines if re.match(r"(F\d{4} |Fatal Python error|terminate called)", l)]
    cause = (fatal or lines or ["it printed nothing"])[-1][:400]
    sys.stderr.write(
        f"error: the process died during a checkpoint {what}: {cause}; everything it printed "
        f"then is in {log_path}\n"
    )
    sys.stderr.flush()
"""


class Aside:
    """What went to stderr: `pass_on` replays it, `keep` leaves it in its file."""

    def __init__(self, path: str = ""):
        self.path, self.text = path, b""

    def pass_on(self) -> None:
        if self.path:
            os.remove(self.path)
        if self.text:
            sys.stderr.write(self.text.decode(errors="replace"))

    def keep(self) -> bool:
        if self.path and not self.text:
            os.remove(self.path)
        return bool(self.path and self.text)


def log_prefix(key: str) -> str:
    """The log name prefix of one checkpoint folder (`key`) and process: a successful save
    removes the logs that its killed predecessors left (`remove_old_logs`), never another
    run's or another process's."""
    import jax

    digest = hashlib.sha256(os.path.abspath(key).encode()).hexdigest()[:12]
    return f"{PREFIX}{digest}_p{jax.process_index()}_"


def remove_old_logs(key: str) -> None:
    for path in glob.glob(os.path.join(tempfile.gettempdir(), log_prefix(key) + "*.log")):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def aside(what: str, key: str = ""):
    """Runs the body with file descriptor 2 going to a watched log file (see the module
    docstring); yields an `Aside` whose `text` is filled once the body is done."""
    try:
        log = tempfile.NamedTemporaryFile(
            prefix=log_prefix(key) if key else PREFIX, suffix=".log", delete=False
        )
        log.close()
        mark = secrets.token_hex(16)
        read_end, write_end = os.pipe()
    except OSError:  # no temporary space either: run as is
        yield Aside()
        return
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, log.name, what, mark],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
        )
    except OSError:
        watcher = None
    os.close(read_end)
    if watcher is None:  # no process to spare: run as is
        os.close(write_end)
        os.remove(log.name)
        yield Aside()
        return
    result = Aside(log.name)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(write_end, 2)
    try:
        yield result
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.write(write_end, mark.encode())
        os.close(write_end)
        try:
            watcher.wait(timeout=30)
        except subprocess.TimeoutExpired:  # something else holds the pipe open
            watcher.kill()
        with open(log.name, "rb") as f:
            text = f.read()
        result.text = text[: -len(mark)] if text.endswith(mark.encode()) else text
