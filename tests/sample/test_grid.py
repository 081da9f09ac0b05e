"""Validation grids: every image placed, small images enlarged, captions wrapped."""

from __future__ import annotations

import numpy as np

from sample.grid import GAP, image_grid, prompt_columns


def test_grid_places_every_image_under_its_prompt():
    images = np.zeros((5, 3, 64, 64, 3), np.uint8)
    for prompt in range(5):
        for seed in range(3):
            images[prompt, seed] = (40 * prompt, 60 * seed, 200)
    sheet = np.asarray(image_grid(images, [f"prompt number {p}" for p in range(5)]))
    found = {tuple(colour) for colour in sheet.reshape(-1, 3)}
    assert all((40 * p, 60 * s, 200) in found for p in range(5) for s in range(3))
    assert tuple(sheet[0, 0]) == (255, 255, 255)  # margin
    assert sheet.shape[1] >= 3 * 64 + 2 * GAP


def test_small_images_are_enlarged_and_layout_is_roughly_square():
    sheet = image_grid(np.full((24, 2, 16, 16, 3), 128, np.uint8), ["a red circle on a green background"] * 24)
    assert 0.5 < sheet.width / sheet.height < 2
    assert sheet.width >= 2 * 64
    assert prompt_columns(1, 4, 64, 64) == 1
    assert prompt_columns(24, 2, 64, 64) in (3, 4)
