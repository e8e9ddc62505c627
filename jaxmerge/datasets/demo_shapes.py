r"""A small image folder of your own, generated: circles, squares and triangles.

    python -m jaxmerge.datasets.demo_shapes --output ~/shapes

writes `~/shapes/<circle|square|triangle>/*` in the `image_folder` layout, the kind of folder a
user brings (README, "Your own data"): each shape filled in a random colour on a random
background (at least MIN_CONTRAST grey levels apart, so the grey modes keep the shape), at a
random size and position inside the centred square, in images of random width and height (40 to 160
px, not square) saved in the modes a real folder mixes (RGB JPEG, grey and 16-bit grey PNG,
RGBA PNG with a transparent background, palette PNG, CMYK JPEG), plus a `.DS_Store`, which
`prepare` ignores and counts. Seeded: the same arguments write the same files.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
# (PIL mode, file suffix) in turn; the 16-bit grey PNG is written from an "I;16" array.
MODES = (("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"),
         ("CMYK", ".jpg"))  # fmt: skip


MIN_CONTRAST = 80  # grey levels between a shape and its background: visible in grey modes too


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _grey(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # PIL's "L" conversion


def _colour_against(rng: np.random.Generator, other) -> tuple[int, int, int]:
    """A random colour at least MIN_CONTRAST grey levels from `other`."""
    while abs(_grey(colour := _colour(rng)) - _grey(other)) < MIN_CONTRAST:
        pass
    return colour


def draw_shape(shape: str, rng: np.random.Generator, fill_rgb) -> Image.Image:
    """One RGBA image: `shape` filled with `fill_rgb`, the background transparent."""
    width, height = (int(v) for v in rng.integers(40, 161, 2))
    side = min(width, height)
    size = rng.uniform(0.35, 0.9) * side
    # Inside the centred square, which is what `prepare` keeps (it centre-crops to a square),
    # as a photographer centres the subject.
    left, top = (width - side) / 2, (height - side) / 2
    cx = left + rng.uniform(size / 2, side - size / 2)
    cy = top + rng.uniform(size / 2, side - size / 2)
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    fill = tuple(fill_rgb) + (255,)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def save_in_mode(image: Image.Image, mode: str, path: pathlib.Path, background_rgb) -> None:
    """Saves an RGBA drawing in `mode`: on an opaque `background_rgb`, except RGBA which keeps
    its transparency (jaxmerge composites it on white when preparing)."""
    if mode == "RGBA":
        image.save(path)
        return
    background = Image.new("RGBA", image.size, tuple(background_rgb) + (255,))
    rgb = Image.alpha_composite(background, image).convert("RGB")
    if mode == "I;16":  # 16-bit grey: 8-bit levels times 257, so 255 -> 65535
        grey = np.asarray(rgb.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(path)  # uint16 arrays are PIL mode "I;16"
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    else:
        rgb.convert(mode).save(path)


def write_folder(root: str, per_class: int = 60, seed: int = 0) -> dict[str, int]:
    """Writes `per_class` images of each shape under `root/<class>/`; returns the count per
    PIL mode."""
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for shape in CLASSES:
        folder = pathlib.Path(root, shape)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode, suffix = MODES[i % len(MODES)]
            # RGBA shapes land on prepare's white background; the others on their own colour.
            background = (255, 255, 255) if mode == "RGBA" else _colour(rng)
            image = draw_shape(shape, rng, _colour_against(rng, background))
            save_in_mode(image, mode, folder / f"{shape}_{i:03d}{suffix}", background)
            counts[mode] = counts.get(mode, 0) + 1
    pathlib.Path(root, CLASSES[0], ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return counts


def main(argv):
    del argv
    root = os.path.expanduser(flags.FLAGS.output)
    counts = write_folder(root, flags.FLAGS.per_class, flags.FLAGS.seed)
    print(f"{root}: {sum(counts.values())} images of {len(CLASSES)} shapes; modes {counts}")


if __name__ == "__main__":
    flags.DEFINE_string("output", None, "folder to write <class>/ subfolders into", required=True)
    flags.DEFINE_integer("per_class", 60, "images per shape")
    flags.DEFINE_integer("seed", 0, "random seed")
    app.run(main)
