"""A deterministic pixel judge for the toy dataset: does an image show what its caption asks?

Each pixel is snapped to the nearest palette colour. The background is the commonest colour
on the border; the shape is the commonest other colour, which must cover a minimum share of
the image. An image is correct when both colours are the caption's.

The shape (`shape_of`) is read from the corners of its bounding box: a square fills all four, a
triangle (apex up, as `pipeline.core.toy.draw` draws it) the bottom two, a circle none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.core.toy import PALETTE, ToySpec

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Verdict:
    background_colour: str
    shape_colour: str | None

    def matches(self, spec: ToySpec) -> bool:
        return self.background_colour == spec.background_colour and self.shape_colour == spec.shape_colour


def snap(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxW indices into the palette (nearest colour in RGB)."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = ((pixels[:, None, :] - _COLOURS[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1).reshape(image.shape[:2])


def judge(image: np.ndarray, min_shape_share: float = 0.04) -> Verdict:
    labels = snap(np.asarray(image))
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[background] = 0
    shape = int(counts.argmax())
    if counts[shape] < min_shape_share * labels.size:
        return Verdict(_NAMES[background], None)
    return Verdict(_NAMES[background], _NAMES[shape])


def is_correct(image: np.ndarray, spec: ToySpec) -> bool:
    return judge(image).matches(spec)


# Corner patches of the shape's bounding box (this share of its side): a square fills all four (even with
# rounded corners or concave sides, as generated ones have), a circle none, a triangle only the bottom two.
CORNER_SHARE = 0.2
SQUARE_MIN_CORNER = 0.35  # drawn circles fill <= 0.17 of a corner patch, VAE reconstructions <= 0.25; squares >= 0.47
TRIANGLE_MIN_BASE = 0.35  # bottom corners minus top corners: drawn triangles 0.75, reconstructions >= 0.64, circles <= 0.25
CIRCLE_MIN_FILL = 0.6  # a drawn circle fills pi/4 = 0.785 of its bounding box; less is a blob, not a circle


def shape_of(image: np.ndarray, min_shape_share: float = 0.04) -> str | None:
    """'circle', 'square' or 'triangle' (`pipeline.core.toy.SHAPES`), or None when no shape stands out from the
    background (too small, not roughly as tall as wide, as every toy shape is, or too ragged for a circle).

    The shape is the largest connected region of pixels that are not the background colour, holes filled
    (a two-tone shape counts whole); the corners of its bounding box tell the shapes apart (CORNER_SHARE).
    """
    labels = snap(np.asarray(image))
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    regions, count = ndimage.label(labels != background)
    if count == 0:
        return None
    region = ndimage.binary_fill_holes(regions == np.bincount(regions.ravel())[1:].argmax() + 1)
    if region.sum() < min_shape_share * labels.size:
        return None
    rows, columns = np.nonzero(region)
    box = region[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    height, width = box.shape
    if not 0.6 <= width / height <= 1.6:
        return None
    patch_rows, patch_columns = max(1, round(height * CORNER_SHARE)), max(1, round(width * CORNER_SHARE))
    top = [box[:patch_rows, :patch_columns].mean(), box[:patch_rows, -patch_columns:].mean()]
    bottom = [box[-patch_rows:, :patch_columns].mean(), box[-patch_rows:, -patch_columns:].mean()]
    if min(top + bottom) >= SQUARE_MIN_CORNER:
        return "square"
    if min(bottom) - max(top) >= TRIANGLE_MIN_BASE:
        return "triangle"
    return "circle" if box.mean() >= CIRCLE_MIN_FILL else None
