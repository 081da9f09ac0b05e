"""Aspect-ratio buckets (encode.buckets): a set of resolutions of about the same pixel count, as the
config resolves and checks it. Each image goes to the bucket nearest its aspect ratio (by log ratio,
so 2:1 and 1:2 are equally far from 1:1); how encode crops it to that bucket is `ingest.encode.crop`.

Bucket sides are multiples of a pixel step: the VAE's downsampling factor (8 for every
SD-family VAE) times the factor the UNet halves its input by (2^(down blocks - 1)), so a
bucket's latent passes the UNet's down and up path without padding: 16 px for the tiny
UNet, 64 px for SD-1.5's. Pure: no torch, PIL or numpy.
"""

from __future__ import annotations

import math

VAE_DOWNSAMPLE = 8
# How often each UNet preset of train/unet.py halves the latent (len(down_block_types) - 1).
UNET_DOWNSAMPLINGS = {"tiny": 1, "micro": 1, "sd15": 3}
# "auto": pixel counts within this share of resolution^2, aspect ratios up to this (SDXL: ~4:1; 2:1 is safer at 256 px).
AUTO_AREA_TOLERANCE = 0.15
AUTO_MAX_RATIO = 2.0

Bucket = tuple[int, int]  # (width, height) in pixels


def pixel_step(unet_preset: str) -> int:
    return VAE_DOWNSAMPLE * 2 ** UNET_DOWNSAMPLINGS[unet_preset]


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def auto_buckets(resolution: int, step: int) -> list[Bucket]:
    """For each width (a multiple of `step`), the height nearest resolution^2 / width, kept if its
    pixel count is within AUTO_AREA_TOLERANCE of resolution^2 and its ratio at most AUTO_MAX_RATIO;
    and each one turned on its side, so tall and wide images get the same choice."""
    area = resolution * resolution
    buckets = []
    for width in range(step, int(resolution * AUTO_MAX_RATIO) + step, step):
        height = max(step, round(area / width / step) * step)
        ratio = max(width / height, height / width)
        if abs(width * height - area) <= AUTO_AREA_TOLERANCE * area and ratio <= AUTO_MAX_RATIO + 1e-9:
            buckets += [(width, height), (height, width)]
    return sorted(set(buckets), key=lambda bucket: bucket[0] / bucket[1])


def check_buckets(buckets: list[Bucket], step: int, where: str = "encode.buckets") -> None:
    """Raise ValueError naming `where` unless every side is a positive multiple of `step` and no bucket repeats."""
    for width, height in buckets:
        if width <= 0 or height <= 0 or width % step or height % step:
            raise ValueError(f"{where}: bucket {width}x{height} has a side that is not a positive multiple of {step} px")
    repeated = sorted({bucket_name(b) for b in buckets if buckets.count(b) > 1})
    if repeated:
        raise ValueError(f"{where}: bucket(s) {', '.join(repeated)} listed more than once")


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose log aspect ratio is nearest the image's; ties go to the earlier bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))
