"""Aspect-ratio buckets (encode.buckets): a set of resolutions of about the same pixel count.

Each image goes to the bucket nearest its aspect ratio (by log ratio, so 2:1 and 1:2 are
equally far from 1:1), is resized to cover the bucket and centre-cropped to it. What was
done is recorded per sample (bucket, original size, crop offset: what SDXL's
micro-conditioning takes) and summed per raw shard for the encode manifest.

Bucket sides are multiples of a pixel step: the VAE's downsampling factor (8 for every
SD-family VAE) times the factor the UNet halves its input by (2^(down blocks - 1)), so a
bucket's latent passes the UNet's down and up path without padding: 16 px for the tiny
UNet, 64 px for SD-1.5's. Pure: PIL and numpy only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

VAE_DOWNSAMPLE = 8
# How often each UNet preset of train/unet.py halves the latent (len(down_block_types) - 1).
UNET_DOWNSAMPLINGS = {"tiny": 1, "sd15": 3}
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


@dataclass(frozen=True)
class Crop:
    """How an image of `original` size becomes `bucket`: resized to `resized` (covering the
    bucket), then cut at (left, top) in the resized image's pixels (SDXL's crop_coords_top_left)."""

    original: Bucket
    bucket: Bucket
    resized: Bucket
    left: int
    top: int

    @property
    def cropped_share(self) -> float:
        """Share of the image's pixels cut away."""
        return 1.0 - (self.bucket[0] * self.bucket[1]) / (self.resized[0] * self.resized[1])

    def record(self) -> dict:
        """What a latent shard's KEY.json holds about it."""
        return {
            "bucket": list(self.bucket),
            "original_size": list(self.original),
            "crop_top_left": [self.top, self.left],
        }


def crop_geometry(width: int, height: int, bucket: Bucket) -> Crop:
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return Crop((width, height), bucket, resized, (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


def square_cropped_share(width: int, height: int) -> float:
    """Share a square centre crop cuts away, for comparison."""
    return 1.0 - min(width, height) ** 2 / (width * height)


def crop_to_bucket(image: Image.Image, buckets: list[Bucket]) -> tuple[np.ndarray, Crop]:
    """(HxWx3 uint8 pixels of the nearest bucket, how they were cut)."""
    image = image.convert("RGB")
    crop = crop_geometry(image.width, image.height, nearest_bucket(image.width, image.height, buckets))
    if crop.resized != image.size:
        image = image.resize(crop.resized, Image.Resampling.BICUBIC)
    box = (crop.left, crop.top, crop.left + crop.bucket[0], crop.top + crop.bucket[1])
    return np.asarray(image.crop(box)), crop


def shard_summary(crops: list[Crop]) -> dict:
    """What a raw shard's progress record adds: images per bucket and the pixels cropped away."""
    counts: dict[str, int] = {}
    for crop in crops:
        counts[bucket_name(crop.bucket)] = counts.get(bucket_name(crop.bucket), 0) + 1
    return {
        "buckets": counts,
        "cropped_share_sum": sum(crop.cropped_share for crop in crops),
        "square_cropped_share_sum": sum(square_cropped_share(*crop.original) for crop in crops),
    }


def manifest_summary(records: list[dict], buckets: list[Bucket]) -> dict:
    """The encode manifest's bucket fields, from complete shards' progress records."""
    counts = {bucket_name(bucket): 0 for bucket in buckets}
    images, cropped, square = 0, 0.0, 0.0
    for record in records:
        for name, count in record.get("buckets", {}).items():
            counts[name] = counts.get(name, 0) + count
            images += count
        cropped += record.get("cropped_share_sum", 0.0)
        square += record.get("square_cropped_share_sum", 0.0)
    return {
        "bucket_counts": counts,
        # Mean share of each image's pixels cropped away, and what a square centre crop would have cut.
        "cropped_share": round(cropped / max(images, 1), 4),
        "square_cropped_share": round(square / max(images, 1), 4),
    }
