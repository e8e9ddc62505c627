"""Shared parts of the jaxmerge TFDS builders: registry, size configs, image codecs, splits.

Every builder here is prepared as array_record and read with `tfds.data_source`, so nothing
may call TensorFlow: images are handed to `tfds.features.Image` as already-encoded PNG/JPEG
bytes (encoding a numpy array inside TFDS needs TensorFlow; decoding uses PIL).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# Builder name (the TFDS name, e.g. "utkface") -> builder class, in import order.
BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {}


def register(cls):
    """Class decorator: records a builder under its TFDS name in `BUILDERS`."""
    BUILDERS[cls.name] = cls
    return cls


@dataclasses.dataclass
class SizeConfig(tfds.core.BuilderConfig):
    """A builder config that fixes the stored image side in pixels (images are square)."""

    image_size: int = 224


def size_configs(*sizes: int) -> list[SizeConfig]:
    """Configs named `size{N}` for each side N; the first one is the builder's default."""
    return [
        SizeConfig(name=f"size{s}", image_size=s, description=f"images resized to {s}x{s}")
        for s in sizes
    ]


# The sizes offered by builders whose originals are photos of varying or large size:
# 224 for the paper's ViT-B/16, 64 and 32 for quick runs and tests.
PHOTO_SIZES = (224, 64, 32)


def image_feature(size: int | None, channels: int, encoding: str = "png") -> tfds.features.Image:
    """A uint8 `Image` feature of shape (size, size, channels) (None: any height and width)."""
    shape = (size, size, channels) if size else (None, None, channels)
    return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format=encoding)


def encode(image: np.ndarray, encoding: str = "png") -> bytes:
    """Encodes a uint8 (H, W) or (H, W, C) array as PNG or JPEG (quality 95) bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    if encoding == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    elif encoding == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"encoding must be one of ('png', 'jpeg'), got {encoding!r}")
    return buffer.getvalue()


def load_rgb(path) -> np.ndarray:
    """Reads an image file as a uint8 (H, W, 3) RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a uint8 (H, W[, C]) array with antialiased bilinear interpolation (PIL)."""
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return out[..., None] if squeeze else out


def center_square(image: np.ndarray) -> np.ndarray:
    """Crops the largest centred square out of an (H, W, ...) array."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square, then resizes to (size, size): no aspect distortion."""
    return resize(center_square(image), size, size)


def crop_with_padding(image: np.ndarray, top: int, left: int, height: int, width: int):
    """Crops image[top:top+height, left:left+width], filling outside the image with zeros."""
    out = np.zeros((height, width, *image.shape[2:]), image.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom = min(top + height, image.shape[0])
    src_right = min(left + width, image.shape[1])
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
            src_top:src_bottom, src_left:src_right
        ]
    return out


def split_items(items: Sequence, fractions: Mapping[str, float], seed: int) -> dict[str, list]:
    """Splits items deterministically: a seeded permutation cut by the given fractions.

    The items are sorted first, so the split depends only on the set of items and the seed,
    not on the order the file system lists them in. The last split takes the remainder.

    Args:
      items: sortable, hashable items (file names, indices, group keys).
      fractions: split name -> fraction, in order; fractions must sum to 1.
      seed: numpy `default_rng` seed.

    Returns:
      split name -> list of items (each item in exactly one split).
    """
    if not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"fractions must sum to 1, got {dict(fractions)}")
    ordered = sorted(items)
    order = np.random.default_rng(seed).permutation(len(ordered))
    names = list(fractions)
    out, start = {}, 0
    for i, name in enumerate(names):
        stop = (
            len(ordered) if i == len(names) - 1 else start + round(fractions[name] * len(ordered))
        )
        out[name] = [ordered[j] for j in order[start:stop]]
        start = stop
    return out


def stratified_split(
    labels: np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Like `split_items` over indices 0..N-1, but cut within each class of `labels`.

    Returns:
      split name -> sorted int index array; each class keeps the fractions (rounded).
    """
    parts: dict[str, list] = {name: [] for name in fractions}
    for class_index, cls in enumerate(np.unique(labels)):
        members = np.flatnonzero(labels == cls).tolist()
        for name, chosen in split_items(members, fractions, seed + class_index).items():
            parts[name].extend(chosen)
    return {name: np.sort(np.asarray(idx, np.int64)) for name, idx in parts.items()}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder) -> list:
    """The image files directly inside `folder` (by suffix, case-insensitive), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name
    )
