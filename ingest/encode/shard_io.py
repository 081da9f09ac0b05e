"""The encode stage's CPU side, free of torch: reading and decoding raw shards, writing latent tars.

Decode tasks import only this module, so they start in a fraction of the time a process
importing torch, diffusers and transformers takes, and leave the cores to the encoder actors
(`ingest.encode.stage`), which write the latent tars with `write_samples`.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ingest.encode import progress, reuse
from ingest.encode.class_labels import label_of
from ingest.encode.crop import Crop, crop_to_bucket, shard_summary
from pipeline.core import layout
from pipeline.core.arrays import to_npy_bytes
from pipeline.core.rundir import RunDir

KEY = "__key__"
SHARD = "shard"
PIXELS = "pixels"
RECORD = "record"  # the last item a decode task yields: the shard's progress record
# Pixels an image may declare before it is skipped undecoded (decompression bombs); the stage
# passes ingest.max_megapixels, whose default this is.
MAX_PIXELS = 89_000_000


# Pure core ---------------------------------------------------------------------------------
def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution`, crop the centre square: HxWx3 uint8."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    if scale != 1:
        size = (
            max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


# Decode tasks ------------------------------------------------------------------------------
def read_raw_samples(handle) -> Iterator[dict[str, bytes]]:
    """Samples of a raw webdataset tar as {suffix: bytes} plus KEY, in order.

    A damaged tar raises after yielding the samples before the damage. Python's tarfile takes
    a tar cut at a header for a complete one, so the end-of-archive blocks are checked too.
    """
    from webdataset.tariterators import base_plus_ext

    current: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                key, suffix = base_plus_ext(member.name)
                if member.isreg() and key is not None and not member.name.startswith("__"):
                    if current and key != current[KEY]:
                        yield current
                        current = {}
                    current.setdefault(KEY, key)
                    current[suffix.lower()] = archive.extractfile(member).read()
                archive.members = []  # tarfile keeps every header otherwise: memory would grow with the shard
            end = archive.offset
        handle.seek(end)
        if handle.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise EOFError(f"no end-of-archive marker after byte {end}: the tar was cut short")
    except Exception:
        if current:  # its members are whole: a damaged member raises before it is added
            yield current
        raise
    if current:
        yield current


def decode_sample(sample: dict[str, bytes], resolution: int, max_pixels: int = MAX_PIXELS, buckets: list | None = None):
    """The centre crop of a sample's image, or None if it has none, it does not decode, or its
    header declares more than `max_pixels` pixels (then nothing is decoded).

    With `buckets` (encode.buckets): (its crop to the nearest bucket, an `ingest.encode.crop.Crop`) instead."""
    data = sample.get(layout.IMAGE_KEY)
    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it, then decodes anyway: skip instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    return None
                return crop_to_bucket(image, buckets) if buckets else center_crop(image, resolution)
    except Exception:  # noqa: BLE001 - any decode error means "skip and count"
        return None


def safe_key(key: str) -> bool:
    """False for keys (tar member names) that are absolute or climb out with `..`: we never
    extract to disk, but such a key would travel on into the latent shards' member names."""
    return bool(key) and not key.startswith("/") and ".." not in key.split("/")


@dataclass(frozen=True)
class DecodeOptions:
    """How a decode task turns a raw shard into batches. Plain values only: Ray pickles it to every task."""

    resolution: int
    """Side of the centre crop in px (encode.resolution); unused with `buckets`."""
    batch_size: int
    """Rows per batch (encode.batch_size); a shard's last batch of each shape may hold fewer."""
    max_pixels: int = MAX_PIXELS
    """An image whose header declares more pixels is skipped undecoded (ingest.max_megapixels)."""
    buckets: list | None = None
    """(width, height) buckets (encode.buckets): each image is cropped to its nearest one instead."""
    previous: dict[str, Any] | None = None
    """`text_embedding_shape` of the latents of another resolution still in place (`ingest.encode.reuse`):
    the batches carry along the text members of the shard's previous latent tar."""
    class_field: str | None = None
    """Metadata field naming each sample's class (encode.class_field); a sample without one is skipped (unlabelled)."""
    classes: list[str] | None = None
    """Class names in label order: each row carries its class's index."""


# A decoded sample: key, caption, meta JSON, HxWx3 pixels, class index (-1: no class labels in this run).
Row = tuple[str, str, bytes, np.ndarray, int]


def decode_shard(run: RunDir, name: str, options: DecodeOptions) -> Iterator[dict[str, Any]]:
    """Batches of one image shape each (one bucket with encode.buckets, else the square), then last
    `{RECORD: the shard's progress record}` (see `new_record`): a decode task streams these to the
    encoder actor that writes the shard's latent tar."""
    reusable = reuse.read_text_members(run, progress.latent_tar_path(progress.stem(name))) if options.previous else None
    record = new_record(name, text_reused=reusable is not None, labelled=bool(options.class_field))

    def batch_of(rows: list[Row]) -> dict[str, np.ndarray]:
        record["valid"] += len(rows)
        batch = _batch(record["shard"], rows)
        if reusable is not None:
            record["text_reused"] += reuse.attach_text(
                batch, [row[0] for row in rows], reusable, options.previous["text_embedding_shape"]
            )
        return batch

    rows_by_shape: dict[tuple, list[Row]] = {}
    crops = []
    try:
        with run.open_read(f"{layout.INGEST_SHARDS}/{name}") as handle:
            for sample in read_raw_samples(handle):
                record["samples"] += 1
                decoded = decode_row(sample, options, record)
                if decoded is None:
                    continue
                row, crop = decoded
                crops += [crop] if crop else []
                rows = rows_by_shape.setdefault(row[3].shape, [])
                rows.append(row)
                if len(rows) == options.batch_size:
                    yield batch_of(rows)
                    rows.clear()
    except Exception as error:  # noqa: BLE001 - a damaged shard keeps what was read before the damage
        record["truncated" if record["samples"] else "unreadable"] = True
        record["error"] = f"{type(error).__name__}: {error}"
    for rows in rows_by_shape.values():
        if rows:
            yield batch_of(rows)
    if options.buckets:
        record.update(shard_summary(crops))
    yield {RECORD: record}


def decode_task(run_url: str, name: str, options: DecodeOptions) -> Iterator[dict[str, Any]]:
    """The body of a decode task (a Ray streaming generator): `decode_shard` of one raw shard."""
    yield from decode_shard(RunDir(run_url), name, options)


def new_record(name: str, text_reused: bool, labelled: bool) -> dict[str, Any]:
    """A raw shard's progress record before its first sample (`ingest.encode.progress`).

    undecodable: no image, no caption, an unsafe key, an image PIL cannot read or one over max_pixels."""
    record = {
        "shard": progress.stem(name),
        "samples": 0,
        "valid": 0,
        "undecodable": 0,
        "truncated": False,
        "unreadable": False,
        "error": None,
        **({"text_reused": 0} if text_reused else {}),
    }
    if labelled:
        record["unlabelled"] = 0
    return record


def decode_row(sample: dict[str, bytes], options: DecodeOptions, record: dict[str, Any]) -> tuple[Row, Crop | None] | None:
    """The sample's row and, with buckets, its crop; None for a sample skipped (counted in `record`)."""
    usable = layout.CAPTION_KEY in sample and safe_key(sample[KEY])
    label = label_of(sample.get(layout.META_KEY), options.class_field, options.classes or []) if options.class_field else -1
    if label is None:
        record["unlabelled"] += 1
        return None
    decoded = decode_sample(sample, options.resolution, options.max_pixels, options.buckets) if usable else None
    if decoded is None:
        record["undecodable"] += 1
        return None
    pixels, crop = decoded if options.buckets else (decoded, None)
    caption = _text(sample[layout.CAPTION_KEY])
    meta = meta_bytes(sample.get(layout.META_KEY), caption, crop.record() if crop else None)
    return (sample[KEY], caption, meta, pixels, label), crop


def _batch(shard: str, rows: list[Row]) -> dict[str, np.ndarray]:
    keys, captions, metas, pixels, labels = zip(*rows)
    return {
        KEY: np.array(keys, dtype=object),
        SHARD: np.array([shard] * len(rows), dtype=object),
        layout.CAPTION_KEY: np.array(captions, dtype=object),
        layout.META_KEY: np.array(metas, dtype=object),
        PIXELS: np.stack(pixels),
        layout.CLASS_KEY: np.array(labels, dtype=np.int64),  # -1: no class labels in this run
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# Write tasks -------------------------------------------------------------------------------
def meta_bytes(raw: Any, caption: str, extra: dict[str, Any] | None = None) -> bytes:
    """The sample's img2dataset JSON (or {} if unreadable) with its caption (and `extra`) added."""
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, TypeError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    meta["caption"] = caption
    meta.update(extra or {})
    return json.dumps(meta).encode("utf-8")


def write_samples(writer, batch: dict[str, np.ndarray], arrays: dict[str, np.ndarray], with_labels: bool) -> int:
    """Append a batch's samples to a latent tar (a webdataset TarWriter): `arrays` (member name -> one
    fp16 row per sample) serialised here, on the CPU; `with_labels` adds each class index. Returns rows."""
    for row, key in enumerate(batch[KEY]):
        sample = {KEY: str(key), **{member: to_npy_bytes(np.asarray(values[row])) for member, values in arrays.items()}}
        sample[layout.META_KEY] = bytes(batch[layout.META_KEY][row])
        if with_labels:
            sample[layout.CLASS_KEY] = str(int(batch[layout.CLASS_KEY][row])).encode()
        writer.write(sample)
    return len(batch[KEY])
