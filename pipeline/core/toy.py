"""The offline toy dataset: coloured shapes on coloured backgrounds, with exact captions.

Every image is drawn from a palette of well-separated colours so that a pixel judge
(`sample.judge`) can tell exactly whether a generated image shows what its caption asks.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# What the toy ingest passes through into every sample's metadata JSON (e.g. encode.class_field = "shape").
SPEC_COLUMNS: tuple[str, ...] = ("shape", "shape_colour", "background_colour")


@dataclass(frozen=True)
class ToySpec:
    """What one toy image shows; the caption is derived from it."""

    shape: str
    shape_colour: str
    background_colour: str

    @property
    def caption(self) -> str:
        return f"a {self.shape_colour} {self.shape} on a {self.background_colour} background"


def all_specs(colours: list[str] | None = None) -> list[ToySpec]:
    """Every (shape, shape colour, background colour) with different colours: 3 x 6 x 5 = 90.

    `colours` keeps only those palette colours (a shifted toy set, e.g. for fine-tuning).
    """
    palette = [name for name in PALETTE if colours is None or name in colours]
    return [ToySpec(shape, fg, bg) for shape, fg, bg in itertools.product(SHAPES, palette, palette) if fg != bg]


def parse_caption(caption: str) -> ToySpec:
    """Inverse of `ToySpec.caption`; raises ValueError on anything else."""
    words = caption.strip().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a toy caption: {caption!r}")
    spec = ToySpec(shape=words[2], shape_colour=words[1], background_colour=words[5])
    if spec.shape not in SHAPES or spec.shape_colour not in PALETTE or spec.background_colour not in PALETTE:
        raise ValueError(f"not a toy caption: {caption!r}")
    return spec


def draw(spec: ToySpec, size: int, rng: np.random.Generator, aspect_ratio: float = 1.0) -> Image.Image:
    """Draw one image; position and size are jittered by `rng`, colours are exact.

    `aspect_ratio` (width / height) widens or heightens the image; its shorter side stays `size`,
    so the shape, sized by it, fits inside either way.
    """
    width, height = max(size, round(size * aspect_ratio)), max(size, round(size / aspect_ratio))
    image = Image.new("RGB", (width, height), PALETTE[spec.background_colour])
    canvas = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.34) * size
    margin = radius + 0.06 * size
    if width == height:
        cx, cy = rng.uniform(margin, size - margin, size=2)
    else:
        cx, cy = rng.uniform(margin, [width - margin, height - margin])
    colour = PALETTE[spec.shape_colour]
    if spec.shape == "circle":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif spec.shape == "square":
        half = radius * 0.85
        canvas.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    else:
        canvas.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
            fill=colour,
        )
    return image


def generate(
    count: int, size: int, seed: int, colours: list[str] | None = None, aspect_ratios: list[float] | None = None
) -> list[tuple[ToySpec, Image.Image]]:
    """`count` images cycling through every spec in a seeded order, so all 90 captions appear.

    With `aspect_ratios` each image takes one of them at random (the square set draws nothing extra).
    """
    rng = np.random.default_rng(seed)
    specs = all_specs(colours)
    out = []
    for index in range(count):
        if index % len(specs) == 0:
            order = rng.permutation(len(specs))
        spec = specs[order[index % len(specs)]]
        ratio = aspect_ratios[rng.integers(len(aspect_ratios))] if aspect_ratios else 1.0
        out.append((spec, draw(spec, size, rng, ratio)))
    return out


def to_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
