"""Checks on a folder of a user's images, before anything is prepared from it.

Three jobs, each a small function: tell a user's images from the junk that file managers and
archivers leave beside them (`is_junk`, `list_folder`), find every image that cannot be decoded
(`read_problem`), and fingerprint the folder so a prepared dataset knows which files it was
made from (`fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

from PIL import UnidentifiedImageError

from jaxmerge.datasets import common

# Files that operating systems write into any folder a user opens; never data. Every name that
# starts with "." is junk too: macOS's .DS_Store and its AppleDouble "._<name>" twins (which
# carry an image's suffix but no image), and hidden folders like .ipynb_checkpoints.
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})


def is_junk(name: str) -> bool:
    """Whether a file or folder name is operating-system or archiver junk, never data."""
    return name.startswith(".") or name.casefold() in JUNK_NAMES


def is_image_name(name: str) -> bool:
    """Whether a file name has one of `common.IMAGE_SUFFIXES` (case-insensitive)."""
    return pathlib.PurePath(name).suffix.lower() in common.IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Listing:
    """The entries directly inside one folder, sorted by name.

    `ignored` counts junk files and folders and files without an image suffix.
    """

    folders: list[pathlib.Path]
    images: list[pathlib.Path]
    ignored: int


def list_folder(folder: pathlib.Path) -> Listing:
    """Sorts the entries of `folder` into sub-folders, images and ignored entries."""
    folders, images, ignored = [], [], 0
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_junk(path.name):
            ignored += 1
        elif path.is_dir():
            folders.append(path)
        elif is_image_name(path.name):
            images.append(path)
        else:
            ignored += 1
    return Listing(folders, images, ignored)


def read_problem(path: pathlib.Path) -> str | None:
    """Why `path` cannot be decoded as the builders decode it (`common.load_rgb`), or None.

    The whole image is decoded: a truncated JPEG opens fine and fails only on its last rows.
    """
    if not path.exists():
        return "a broken link: its target does not exist"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        common.load_rgb(path, exif_orientation=True)
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, struct.error,
    # ...); whichever it is, it is this file's problem and is reported with its path.
    except Exception as error:
        return f"cannot decode: {error}"
    return None


def non_images(root: pathlib.Path) -> list[str]:
    """The files under `root` that are neither junk nor images by suffix (a notes.txt, a
    .heic photo), as sorted paths relative to `root`: prepare names them, as it leaves them out."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not is_junk(name)]
        found += [
            pathlib.Path(folder, name).relative_to(root).as_posix()
            for name in files
            if not is_junk(name) and not is_image_name(name)
        ]
    return sorted(found)


def fingerprint(root: pathlib.Path) -> str:
    """A SHA-256 over the sorted relative paths, sizes and mtimes of the images under `root`.

    Junk (`is_junk`) and non-image files are left out: a file manager writing .DS_Store, or a
    README edit, does not change the data. Symlinked folders are followed, as the builders
    follow them.
    """
    lines = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not is_junk(name)]
        for name in files:
            if is_junk(name) or not is_image_name(name):
                continue
            path = pathlib.Path(folder, name)
            try:
                stat = path.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # a broken link, which the scan reports or skips
                size, mtime = -1, -1
            lines.append(f"{path.relative_to(root).as_posix()}\t{size}\t{mtime}")
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()
