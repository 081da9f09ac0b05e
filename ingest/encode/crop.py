"""Cropping an image to its aspect-ratio bucket (encode.buckets): resized to cover the bucket nearest
its aspect ratio (`pipeline.core.buckets.nearest_bucket`), then centre-cropped to it. What was done is
recorded per sample (bucket, original size, crop offset: what SDXL's micro-conditioning takes) and
summed per raw shard for the encode manifest. Pure: PIL and numpy only, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.core.buckets import Bucket, bucket_name, nearest_bucket


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
