"""Validation image grids: one labelled block per prompt (its seeds side by side), blocks wrapped
into a roughly square sheet so that two dozen prompts stay small and readable."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (40, 40, 40)
GAP = 6  # pixels between prompt blocks
SEED_GAP = 2  # pixels between the images of one prompt
LINE_HEIGHT = 12  # Pillow's built-in font at its default size
MAX_LINES = 4
MIN_SIDE = 64  # smaller images are enlarged (nearest neighbour) to at least this many pixels


def prompt_columns(prompts: int, seeds: int, height: int, width: int) -> int:
    """How many prompt blocks per row make the sheet closest to square."""
    block_aspect = (seeds * (width + SEED_GAP)) / max(height, 1)
    return max(1, min(prompts, round(math.sqrt(prompts / block_aspect))))


def image_grid(images: np.ndarray, prompts: list[str]) -> Image.Image:
    """uint8 [P, S, H, W, 3] -> one RGB sheet; each prompt's S images in a row under its caption."""
    zoom = max(1, math.ceil(MIN_SIDE / min(images.shape[2:4])))
    if zoom > 1:
        images = images.repeat(zoom, axis=2).repeat(zoom, axis=3)
    count, seeds, height, width, _ = images.shape
    font = ImageFont.load_default()
    block_width = seeds * width + (seeds - 1) * SEED_GAP
    labels = [wrap(prompt, font, block_width) for prompt in prompts]
    labels = [lines[: MAX_LINES - 1] + [lines[MAX_LINES - 1] + " …"] if len(lines) > MAX_LINES else lines for lines in labels]
    label_height = LINE_HEIGHT * max(len(lines) for lines in labels) + 2
    columns = prompt_columns(count, seeds, height + label_height, width)
    rows = math.ceil(count / columns)
    sheet = Image.new(
        "RGB",
        (columns * block_width + (columns + 1) * GAP, rows * (label_height + height) + (rows + 1) * GAP),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for index, lines in enumerate(labels):
        row, column = divmod(index, columns)
        left = GAP + column * (block_width + GAP)
        top = GAP + row * (label_height + height + GAP)
        for number, line in enumerate(lines):
            draw.text((left, top + number * LINE_HEIGHT), line, fill=TEXT, font=font)
        for seed in range(seeds):
            sheet.paste(Image.fromarray(images[index, seed]), (left + seed * (width + SEED_GAP), top + label_height))
    return sheet


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to lines at most `width` pixels wide (a longer single word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
