"""One training process per run folder: a lock file holding the holder's PID and host.

Two processes training the same task into the same workdir would both write its checkpoints
(Orbax then fails, or the second silently resumes the first's run under its own config). The
lock is taken before anything is read; a lock left by a dead process on this host is taken
over with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from absl import logging

LOCK_FILE = "run.lock"


class RunLockedError(ValueError):
    """Another live process is training this run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take(path: str, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


@contextlib.contextmanager
def hold(directory: str):
    """Holds `directory`'s lock for the body; raises RunLockedError if a live process has it."""
    path = os.path.join(directory, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while not _take(path, me):
        try:
            with open(path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == me["host"] and isinstance(pid, int) and not _alive(pid):
            logging.warning("taking over %s: its holder (pid %d) is gone", path, pid)
            print(f"note: taking over the lock {path} of a process that is gone (pid {pid})")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        raise RunLockedError(
            f"run {directory} is being trained by process {pid} on host {host!r} (lock file "
            f"{path}); wait for it to finish, or delete the lock file if that process is gone"
        )
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                if json.load(f) == me:
                    os.remove(path)
