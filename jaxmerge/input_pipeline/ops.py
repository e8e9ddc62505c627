"""Preprocessing ops: small pure functions of `(example, rng) -> example`, composed.

An example is a dict of numpy arrays (`image` (H, W, C) uint8 or float, a label, landmarks).
`rng` is a `numpy.random.Generator` seeded from (seed, epoch, example index) by the loader, so
augmentation is a pure function of those keys.

Landmarks (`landmarks`, float (K, 2) of (x, y) in [0, 1] of the image width and height, 0 at
the left/top edge, 1 at the right/bottom edge) follow every geometric op. A horizontal flip maps
x -> 1 - x *and* must swap left and right points, so `random_flip` needs the dataset's flip
permutation for landmark examples (WFLW: `jaxmerge.datasets.wflw.FLIP_PERMUTATION`); without one
it refuses landmark examples: leave the flip out of landmark tasks, or pass the permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

Example = dict[str, Any]
Preprocess = Callable[[Example, np.random.Generator], Example]


def compose(*fns: Preprocess) -> Preprocess:
    """`compose(f, g)(ex, rng) = g(f(ex, rng), rng)`: applies the functions left to right."""

    def composed(example: Example, rng: np.random.Generator) -> Example:
        for fn in fns:
            example = fn(example, rng)
        return example

    return composed


class Built:
    """The preprocess function `build()` returns, made on first use in the process that runs
    it. Ops are closures, which do not pickle; `build` (a module-level function with its
    arguments, e.g. a `functools.partial`) does, so worker processes receive this instead."""

    def __init__(self, build: Callable[[], Preprocess]):
        self.build, self._fn = build, None

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        if self._fn is None:
            self._fn = self.build()
        return self._fn(example, rng)

    def __getstate__(self):
        return {"build": self.build, "_fn": None}


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
        # In place, the same operations in the same order: one new array, not three.
        image = np.array(example["image"], np.float32)
        image /= 255.0
        image -= mean32
        image /= std32
        return _with_image(example, image)

    return fn


def normalize_to_minus_one_one() -> Preprocess:
    """uint8 image -> float32 `image / 127.5 - 1` in [-1, 1] (the ViT / big_vision convention)."""
    return normalize(mean=(0.5,), std=(0.5,))


def _shifted(image: np.ndarray, down: int, right: int) -> np.ndarray:
    """`image` moved `down` rows and `right` columns, zeros where nothing moved in: the crop
    of the zero-padded image, without building the padded copy (np.pad was half of the
    per-example cost of preprocessing a 28 px training image)."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    if abs(down) >= height or abs(right) >= width:
        return out  # moved out of the frame
    rows = slice(max(0, down), min(height, height + down))
    cols = slice(max(0, right), min(width, width + right))
    from_rows = slice(max(0, -down), min(height, height - down))
    from_cols = slice(max(0, -right), min(width, width - right))
    out[rows, cols] = image[from_rows, from_cols]
    return out


def random_crop(padding: int, points: str | None = "landmarks") -> Preprocess:
    """Pads `padding` zero pixels on every side, then crops the original size at a random spot.

    A crop offset (dy, dx) in [0, 2 * padding] moves content by (padding - dy, padding - dx)
    pixels, so the (K, 2) relative (x, y) points under key `points` (None: none) move by
    `x += (padding - dx) / W`, `y += (padding - dy) / H`.
    """
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")

    def fn(example, rng):
        image = np.asarray(example["image"])
        height, width = image.shape[:2]
        dy, dx = rng.integers(0, 2 * padding + 1, size=2)
        out = _with_image(example, _shifted(image, int(padding - dy), int(padding - dx)))
        if points in example:
            shift = np.array([(padding - dx) / width, (padding - dy) / height], np.float32)
            out[points] = np.asarray(example[points], np.float32) + shift
        return out

    return fn


def _mirrored(image: np.ndarray) -> np.ndarray:
    """`image[:, ::-1]` as a new contiguous array. numpy copies a reversed view one channel
    value at a time (430 us for a 224 px RGB image, the slowest step of its preprocessing);
    PIL mirrors a uint8 image in 170 us, `np.take` any other in 250 us."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3):
        mirrored = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        mirrored = np.array(mirrored.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        return mirrored.reshape(image.shape)
    return np.take(image, np.arange(image.shape[1] - 1, -1, -1), axis=1)


def flip_horizontally(
    example: Example, landmark_permutation: np.ndarray | None, points: str | None = "landmarks"
) -> Example:
    """Mirrors the image left-right; the (K, 2) relative (x, y) points under key `points`
    (None: none) become `1 - x`, then reorder by the permutation:
    `flipped[i] = mirror(points[landmark_permutation[i]])`.
    """
    out = _with_image(example, _mirrored(np.asarray(example["image"])))
    if points in example:
        if landmark_permutation is None:
            raise ValueError(
                "random_flip: example has landmarks but landmark_permutation is None; pass the "
                "dataset's flip permutation (e.g. wflw.FLIP_PERMUTATION) or do not flip"
            )
        moved = np.asarray(example[points], np.float32)[landmark_permutation]
        out[points] = np.stack([1.0 - moved[:, 0], moved[:, 1]], axis=1)
    return out


def random_flip(
    landmark_permutation: Sequence[int] | None = None, points: str | None = "landmarks"
) -> Preprocess:
    """Horizontal flip with probability 1/2 (see `flip_horizontally` for the points)."""
    perm = None if landmark_permutation is None else np.asarray(landmark_permutation)
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise ValueError("random_flip: landmark_permutation must be a permutation of 0..K-1")

    def fn(example, rng):
        return flip_horizontally(example, perm, points) if rng.random() < 0.5 else example

    return fn
