"""A deterministic pixel judge for the toy dataset: does an image show what its caption asks?

Each pixel is snapped to the nearest palette colour. The background is the commonest colour
on the border; the shape is the commonest other colour, which must cover a minimum share of
the image. An image is correct when both colours are the caption's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.toy import PALETTE, ToySpec

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
