"""The toy pixel judge: exact on real toy images, and it says no to the wrong colours."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.toy import PALETTE, ToySpec, generate
from sample.judge import is_correct, judge


@pytest.fixture(scope="module")
def toy_images():
    return [(spec, np.asarray(image)) for spec, image in generate(300, 64, seed=1234)]


def swap_colours(image: np.ndarray, spec: ToySpec) -> np.ndarray:
    """The same drawing with the shape and background colours exchanged, pixel for pixel."""
    background = np.all(image == PALETTE[spec.background_colour], axis=-1)
    shape = np.all(image == PALETTE[spec.shape_colour], axis=-1)
    assert background.any() and shape.any()
    out = image.copy()
    out[background] = PALETTE[spec.shape_colour]
    out[shape] = PALETTE[spec.background_colour]
    return out


def test_judge_accepts_every_fresh_toy_image(toy_images):
    wrong = [spec.caption for spec, image in toy_images if not is_correct(image, spec)]
    assert wrong == []


def test_judge_reads_both_colours(toy_images):
    for spec, image in toy_images[:90]:
        verdict = judge(image)
        assert (verdict.background_colour, verdict.shape_colour) == (spec.background_colour, spec.shape_colour)


def test_judge_rejects_swapped_colours(toy_images):
    for spec, image in toy_images:
        swapped_spec = ToySpec(spec.shape, spec.background_colour, spec.shape_colour)
        assert not is_correct(image, swapped_spec), spec.caption  # the caption asks the other way round
        swapped = swap_colours(image, spec)
        assert not is_correct(swapped, spec), spec.caption
        assert is_correct(swapped, swapped_spec), spec.caption


def test_judge_rejects_wrong_background_or_shape_colour(toy_images):
    for spec, image in toy_images[:90]:
        others = [c for c in PALETTE if c not in (spec.shape_colour, spec.background_colour)]
        assert not is_correct(image, ToySpec(spec.shape, spec.shape_colour, others[0]))
        assert not is_correct(image, ToySpec(spec.shape, others[1], spec.background_colour))


def test_judge_rejects_a_blank_image():
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(PALETTE["blue"], np.uint8)
    assert judge(blank).shape_colour is None
    assert not is_correct(blank, ToySpec("circle", "red", "blue"))


def test_judge_tolerates_mild_pixel_noise(toy_images):
    """Generated images are never palette-exact; moderate noise must not flip a verdict."""
    rng = np.random.default_rng(0)
    for spec, image in toy_images[:90]:
        noisy = np.clip(image.astype(np.int16) + rng.normal(0, 20, image.shape).round().astype(np.int16), 0, 255)
        assert is_correct(noisy.astype(np.uint8), spec), spec.caption
