"""Folders written whole or not at all: checked first, written into a hidden sibling, renamed.

    check_target("models/m", "--output")            # before any compute: one-line ValueError
    with stage([("--output", "models/m"), ("--export_peft", "peft/m")]) as staged:
        write_model(staged["--output"])             # hidden siblings, made on entry
    # renamed into place on a clean exit; removed on an error

A partial folder is named `.NAME.partial-HOST-PID-RANDOM` beside its target. A merge killed
mid-write leaves one; the next write into the same parent removes those of this host whose
process is gone (`remove_stale_partials`). Going by the writer's pid, not by age, keeps a long
learned merge's partial safe however long it runs; partials of other hosts (a shared disk) are
left to their own host, except ones without a pid (written before pids were recorded) older than
`OLD_FORMAT_STALE_S`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence

PARTIAL = ".partial-"
OLD_FORMAT_STALE_S = 3600.0  # those were written in seconds to minutes, just before the rename


def resolve(folder: str) -> str:
    """The absolute path written to: a symlink (to an empty folder, say) is followed, so the
    model lands where it points and the link stays."""
    path = os.path.abspath(os.path.expanduser(folder))
    return os.path.realpath(path) if os.path.islink(path) else path


def _existing_ancestor(path: str) -> str:
    parent = os.path.dirname(path)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def check_target(folder: str, flag: str = "--output") -> str:
    """Raises a one-line ValueError naming `flag` unless `folder` can become a new folder here:
    not a file, not a non-empty folder, not a mount point (a folder that cannot be renamed
    over), in a parent this process can write. Returns the resolved path (`resolve`)."""
    path = resolve(folder)
    if (os.path.lexists(path) and not os.path.isdir(path)) or (
        os.path.isdir(path) and os.listdir(path)
    ):
        raise ValueError(
            f"{flag}: {folder!r} exists and is not empty; allowed: a new or empty folder "
            f"(remove it or choose another)"
        )
    if os.path.isdir(path) and os.path.ismount(path):
        raise ValueError(
            f"{flag}: {folder!r} is a mount point, which cannot be replaced by the finished "
            f"folder; allowed: a new folder, or an empty one that is not a mount point (a "
            f"folder inside it)"
        )
    parent = _existing_ancestor(path)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}: {folder!r}: {parent!r} is not a folder; allowed: a new path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag}: cannot write in {parent!r} (no write permission); allowed: a folder in "
            f"a place this user can write"
        )
    return path


def check_distinct(requests: Sequence[tuple[str, str | None]]) -> None:
    """Raises ValueError when two of the (flag, folder) requests are one folder or one lies
    inside another (`--output X --export_peft X`); None folders are not asked for."""
    given = [(flag, folder, resolve(folder)) for flag, folder in requests if folder]
    for i, (flag, folder, path) in enumerate(given):
        for other_flag, _, other in given[:i]:
            if path == other or path.startswith(other + os.sep) or other.startswith(path + os.sep):
                raise ValueError(
                    f"{flag}: {folder!r} is, or is inside, the {other_flag} folder (or holds "
                    f"it); allowed: a folder of its own"
                )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale(name: str, parent: str, host: str | None = None, now: float | None = None) -> bool:
    """Whether `parent/name` is a partial folder whose writer is gone (see the module doc)."""
    if not name.startswith(".") or PARTIAL not in name:
        return False
    host = socket.gethostname() if host is None else host
    owner = name.rpartition(PARTIAL)[2].rsplit("-", 2)  # [HOST, PID, RANDOM]
    if len(owner) == 3 and owner[1].isdigit():
        return owner[0] == host and not _pid_alive(int(owner[1]))
    try:
        age = (time.time() if now is None else now) - os.lstat(os.path.join(parent, name)).st_mtime
    except FileNotFoundError:
        return False
    return age > OLD_FORMAT_STALE_S


def remove_stale_partials(parent: str) -> list[str]:
    """Removes the stale partial folders (`is_stale`) in `parent`; returns their paths."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if entry.is_dir(follow_symlinks=False) and is_stale(entry.name, parent):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def _make_partial(path: str, flag: str, folder: str) -> str:
    parent = os.path.dirname(path)
    prefix = f".{os.path.basename(path)}{PARTIAL}{socket.gethostname()}-{os.getpid()}-"
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_partials(parent)
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as error:
        raise ValueError(
            f"{flag}: cannot write beside {folder!r} ({error.strerror}); allowed: a folder in "
            f"a place this user can write"
        ) from None


def _commit(partial: str, path: str, flag: str, folder: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp's private 0o700 is for the partial only
    try:
        os.rename(partial, path)  # replaces an empty folder; never a non-empty one
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            why = "another process wrote into it meanwhile (a concurrent merge?)"
        elif error.errno in (errno.EBUSY, errno.EXDEV):
            why = "it cannot be replaced (a mount point?)"
        else:
            why = error.strerror
        raise ValueError(
            f"{flag}: could not put the finished folder at {folder!r}: {why}; nothing was "
            f"written there; allowed: a new or empty folder"
        ) from None


@contextlib.contextmanager
def stage(requests: Sequence[tuple[str, str | None]]) -> Iterator[dict[str, str]]:
    """Checks the (flag, folder) requests (`check_target`, `check_distinct`), makes a hidden
    partial folder beside each and yields {flag: partial}; on a clean exit renames each into
    place in order, on an error (or a failed rename) removes every partial not yet renamed.
    Folders None are skipped."""
    wanted = [(flag, folder) for flag, folder in requests if folder is not None]
    check_distinct(wanted)
    paths = {flag: check_target(folder, flag) for flag, folder in wanted}
    partials: dict[str, str] = {}
    try:
        for flag, folder in wanted:
            partials[flag] = _make_partial(paths[flag], flag, folder)
        yield dict(partials)
        for flag, folder in wanted:
            _commit(partials[flag], paths[flag], flag, folder)
            del partials[flag]
    finally:
        for partial in partials.values():
            shutil.rmtree(partial, ignore_errors=True)
