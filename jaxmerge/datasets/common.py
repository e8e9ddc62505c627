"""Shared parts of the jaxmerge TFDS builders: registry, size configs, image codecs, splits.

Every builder here is prepared as array_record and read with `tfds.data_source`, so nothing
may call TensorFlow: images are handed to `tfds.features.Image` as already-encoded PNG/JPEG
bytes (encoding a numpy array inside TFDS needs TensorFlow; decoding uses PIL).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

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


def dataset_info(
    builder: tfds.core.DatasetBuilder,
    homepage: str | None,
    supervised_keys: tuple[str, str] = ("image", "label"),
    metadata: tfds.core.Metadata | None = None,
    **features: tfds.features.FeatureConnector,
) -> tfds.core.DatasetInfo:
    """A builder's `DatasetInfo`: the builder module's docstring as the description, and the
    features by name (`image=image_feature(...)`, `label=ClassLabel(...)`). `metadata`: what
    the builder records while preparing (e.g. a `tfds.core.MetadataDict`)."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=sys.modules[type(builder).__module__].__doc__,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=supervised_keys,
        homepage=homepage,
        metadata=metadata,
    )


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


# What shows through transparent pixels (RGBA, LA, PA, a palette or colour key with
# transparency): white, as image viewers and browsers draw transparent images on a page.
BACKGROUND = (255, 255, 255)
# Modes holding 16-bit grey levels 0..65535 ("I" is how PIL reads 16-bit TIFF/PNG grey; wider
# values in "I" are refused rather than guessed).
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """Maps 16-bit levels to 8 bits by rounding `v * 255 / 65535` (65535 -> 255, 32768 -> 128).

    Computed in one uint32 buffer (65535 * 255 + 32767 < 2**32), in place: 4 bytes a pixel
    besides the uint8 result, not the 16 of int64 temporaries (a 13300 x 13300 scan).

    Raises:
      ValueError: a value outside 0..65535 (a 32-bit image, which has no fixed range).
    """
    values = np.asarray(values)
    if values.dtype != np.uint16:  # PIL's "I" mode reads as int32: check the range first
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"grey levels span {low}..{high}; allowed: 16-bit levels 0..65535 (a 32-bit "
                f"image has no fixed white level: convert it to 8 or 16 bits first)"
            )
    scaled = values.astype(np.uint32)
    scaled *= 255
    scaled += 32767
    scaled //= 65535
    return scaled.astype(np.uint8)


def composite(rgba: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """Blends a uint8 (H, W, 4) RGBA array onto an RGB colour: `(rgb * a + bg * (255 - a)) / 255`,
    rounded; returns uint8 (H, W, 3)."""
    rgb, alpha = rgba[..., :3].astype(np.int32), rgba[..., 3:].astype(np.int32)
    bg = np.asarray(background, np.int32)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image, background=BACKGROUND) -> np.ndarray:
    """A decoded PIL image of any mode as a uint8 (H, W, 3) RGB array.

    16-bit grey is scaled to 8 bits (`scale_16_to_8`), not clipped (PIL's own `convert("RGB")`
    turns every level above 255 white); 16-bit RGB(A) is already scaled by PIL when it reads
    it. Transparent pixels are blended onto `background`; CMYK, YCbCr, HSV and palettes go
    through PIL's conversions, CIELab through LittleCMS (PIL's direct conversion is wrong).

    Raises:
      ValueError: a float ("F") image or 32-bit levels, which have no fixed white level.
    """
    mode = image.mode
    if mode == "F":
        raise ValueError(
            "mode 'F' (32-bit float pixels) has no fixed white level; allowed: 8- or 16-bit "
            "grey, RGB, palette, CMYK and their alpha variants"
        )
    if mode in _GREY_16:
        return np.repeat(scale_16_to_8(np.asarray(image))[..., None], 3, axis=-1)
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return np.asarray(ImageCms.applyTransform(image, lab_to_srgb))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        if mode == "La":  # premultiplied: PIL converts it only to LA
            image = image.convert("LA")
        return composite(np.asarray(image.convert("RGBA")), background)
    return np.asarray(image.convert("RGB"))


# The most pixels a file may have: above the 100-megapixel cameras (11648 x 8736 = 101.8 M),
# below the 16-bit 13300 x 13300 scans that cost 4 GB to decode and reach a model as a few
# hundred pixels anyway. Checked from the header, before anything is decoded.
MAX_PIXELS = 2**27


def check_pixel_count(path, width: int, height: int) -> None:
    """Raises ValueError naming the file, its pixel count and `MAX_PIXELS` when it is over."""
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{path}: {width} x {height} = {width * height:,} pixels; allowed: at most "
            f"{MAX_PIXELS:,} pixels (decoding it would need several GB; scale it down first)"
        )


def file_inside(folder, name: str, where: str):
    """`folder / name` for a file name read from an annotation file; ValueError naming `where`
    when the name is absolute or its `..` lead out of `folder` (a crafted annotation would
    read any file the user can read). Checked on the names, not through symlinks: an images
    folder may be a link to another disk."""
    top = os.path.normpath(os.fspath(folder))
    joined = os.path.normpath(os.path.join(top, name))
    if os.path.isabs(name) or os.path.commonpath([joined, top]) != top or joined == top:
        raise ValueError(
            f"{where}: image {name!r} is outside {top}; allowed: a path inside that folder"
        )
    return folder / name


def load_rgb(path, *, exif_orientation: bool = False, background=BACKGROUND) -> np.ndarray:
    """Reads an image file as a uint8 (H, W, 3) RGB array (`to_rgb` over any mode); a file of
    more than `MAX_PIXELS` pixels is refused from its header, before it is decoded.

    Args:
      path: the image file.
      exif_orientation: turn the pixels upright as the file's EXIF orientation tag says
        (`ImageOps.exif_transpose`), as a viewer shows them. Off by default: box and landmark
        annotations (expw, wflw) give coordinates on the stored pixel grid.
      background: the RGB colour transparent pixels are blended onto.
    """
    with warnings.catch_warnings():  # PIL's own bomb warning: MAX_PIXELS is the bound here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:  # over twice PIL's bound, from the header
            raise ValueError(f"{path}: {error}; allowed: at most {MAX_PIXELS:,} pixels") from None
    with image:
        check_pixel_count(path, *image.size)
        image.load()
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image, background)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a uint8 (H, W[, C]) array with antialiased bilinear interpolation (PIL)."""
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return out[..., None] if squeeze else out


def center_square_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square in a height x width image."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def center_square(image: np.ndarray) -> np.ndarray:
    """Crops the largest centred square out of an (H, W, ...) array."""
    top, left, side = center_square_box(*image.shape[:2])
    return image[top : top + side, left : left + side]


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square, then resizes to (size, size): no aspect distortion."""
    return resize(center_square(image), size, size)


def load_upright(path) -> np.ndarray:
    """A whole image file as a viewer shows it: `load_rgb` turned upright by its EXIF tag."""
    return load_rgb(path, exif_orientation=True)


def file_image(path, size: int) -> np.ndarray:
    """The one way a whole image file becomes a square example, in `prepare` (image_folder,
    utkface, firerisk) and in `jaxmerge.prediction`: decoded to RGB (`to_rgb`), turned upright
    by its EXIF orientation, centre-cropped to the largest square, resized (antialiased
    bilinear) to (size, size). Returns uint8 (size, size, 3)."""
    return square_resize(load_upright(path), size)


def as_stored(image: np.ndarray, channels: int = 3, encoding: str | None = None) -> np.ndarray:
    """A uint8 (H, W, 3) image as a prepared dataset stores and reads it back: grey
    (PIL's "L" luma) for a 1-channel dataset, then encoded (`encode`) and decoded by TFDS's
    own `Image` feature, which training reads with; `encoding` None: no round trip.
    Returns uint8 (H, W, channels)."""
    if channels == 1:
        image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    elif channels != 3:
        raise ValueError(f"channels: got {channels}; allowed: 1 or 3")
    if encoding is None:
        return image
    feature = image_feature(None, channels, encoding)
    return feature.decode_example_np(encode(image, encoding))


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


# What training, evaluation and predict read as images (a GIF: its first frame, as PIL decodes
# it); prepare names the files it leaves out for having none of these suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def image_files(folder) -> list:
    """The image files directly inside `folder` (by suffix, case-insensitive), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name
    )
