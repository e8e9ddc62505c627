"""Stderr set aside while Orbax saves or reads a checkpoint.

A save that fails on a full disk makes Orbax's writer threads print hundreds of tracebacks;
they belong in a file, not before the one line that says what happened. File descriptor 2
(Python, absl and TensorStore's C++ alike) goes to a temporary `jaxmerge_save_*.log`, removed
after a step that went well.

A process can also die inside a save (a multi-host peer gone: gloo aborts, exit 134), where
no `finally` runs. For saves (`watched=True`) the log is written by a small watcher process
holding the real stderr: told nothing at the end, it prints the log's last lines and its path
there, so the cause is never only in a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

# The watcher: copies its stdin (the saving process's fd 2) into the log; then reads one
# verdict. An empty verdict means the saver died before it could say the save ended.
_WATCHER = r"""
import os, sys
log, verdict_fd = sys.argv[1], int(sys.argv[2])
with open(log, "ab") as out:
    while chunk := os.read(0, 1 << 16):
        out.write(chunk)
if not os.read(verdict_fd, 8):
    with open(log, "rb") as f:
        tail = f.read()[-4000:].decode(errors="replace")
    os.write(2, (f"jaxmerge: the process stopped during a checkpoint save; its last messages "
                 f"(all of them in {log}):\n{tail}").encode())
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


@contextlib.contextmanager
def stderr_aside(watched: bool = False):
    """Runs the body with fd 2 going to a temporary log (`Aside` says what was written)."""
    try:
        capture = tempfile.NamedTemporaryFile(prefix="jaxmerge_save_", suffix=".log", delete=False)
    except OSError:  # no temporary space either: run as is
        yield Aside()
        return
    aside = Aside(capture.name)
    watcher, verdict = _start_watcher(capture.name) if watched else (None, None)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    if watcher is None:
        os.dup2(capture.fileno(), 2)
    else:
        os.dup2(watcher.stdin.fileno(), 2)
        watcher.stdin.close()  # fd 2 is now the pipe's only write end
    try:
        yield aside
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)  # closes the pipe: the watcher sees the end of its input
        os.close(saved_fd)
        if watcher is not None:
            os.write(verdict, b"ended")
            os.close(verdict)
            watcher.wait()
        capture.seek(0)
        aside.text = capture.read()
        capture.close()


def _start_watcher(log: str):
    """(the watcher process, the write end of its verdict pipe)."""
    verdict_read, verdict_write = os.pipe()
    watcher = subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHER, log, str(verdict_read)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        pass_fds=(verdict_read,),
    )
    os.close(verdict_read)
    return watcher, verdict_write
