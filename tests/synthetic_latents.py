"""A synthetic encode-stage output: latent shards and a manifest, with no encoding done.

The manifest names the builtin tiny encoders (their real identity records), so the train
stage's encoder check accepts it unless a test says otherwise.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile

import numpy as np

from ingest.encode.stage import latent_members
from pipeline.core import layout
from pipeline.core.arrays import from_npy_bytes, to_base64_npy, to_npy_bytes
from pipeline.core.config import EncodeConfig
from pipeline.core.identity import Encoders
from pipeline.core.rundir import RunDir

LATENT_SHAPE = (4, 8, 8)
TEXT_SHAPE = (77, 64)


def shard_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_members(
    key: str, latent: np.ndarray, text: np.ndarray, caption: str, extra: dict[str, np.ndarray] | None = None
) -> list[tuple[str, bytes]]:
    """One sample's tar members; `extra` maps further member names (std, flipped) to arrays."""
    members = [
        (f"{key}.{layout.LATENT_KEY}", to_npy_bytes(latent)),
        (f"{key}.{layout.TEXT_EMBEDDING_KEY}", to_npy_bytes(text)),
        (f"{key}.{layout.META_KEY}", json.dumps({"caption": caption}).encode()),
    ]
    return members + [(f"{key}.{name}", to_npy_bytes(array)) for name, array in (extra or {}).items()]


@functools.cache
def builtin_encoder_records() -> dict:
    """The vae, text_encoder and tokenizer records encode writes for the default encoders."""
    config = EncodeConfig()
    return Encoders.load(config).records(config)


def latent_shard_entries(names: list[str], shards: list[list[tuple[str, bytes]]], manifest: dict) -> list[dict]:
    """The manifest's `latent_shards` for tars `names` holding `shards` (each tar is one raw shard's
    only part): samples are the keys with a latent member; with manifest["bucket_latent_shapes"], also
    per bucket by latent shape (a latent of no bucket's shape counts in no bucket)."""
    bucket_of_shape = {tuple(shape): name for name, shape in manifest.get("bucket_latent_shapes", {}).items()}
    entries = []
    for name, members in sorted(zip(names, shards)):
        latents = [data for member, data in members if member.endswith(f".{layout.LATENT_KEY}")]
        entry = {"name": name.removesuffix(".tar"), "parts": [name], "samples": len(latents)}
        if bucket_of_shape:
            counts: dict[str, int] = {}
            for data in latents:
                bucket = bucket_of_shape.get(from_npy_bytes(data).shape)
                if bucket is not None:
                    counts[bucket] = counts.get(bucket, 0) + 1
            entry["buckets"] = dict(sorted(counts.items()))
            entry["samples"] = sum(counts.values())  # encode writes no latent outside a bucket
        entries.append(entry)
    return entries


def write_encode_output(
    root,
    shards: list[list[tuple[str, bytes]]],
    encode: EncodeConfig | None = None,
    encoder_records: dict | None = None,
    manifest_fields: dict | None = None,
) -> RunDir:
    """Write `shards` (each a list of tar members) as 00000.tar, ... and the manifest the encode
    stage would write for them under `encode`'s options; `encoder_records` default to the builtin ones.
    `manifest_fields` (such as buckets and bucket_latent_shapes) are added to the manifest."""
    encode = encode or EncodeConfig()
    run = RunDir(root)
    names = [f"{index:05d}.tar" for index in range(len(shards))]
    for name, members in zip(names, shards):
        run.write_bytes(f"{layout.ENCODE_SHARDS}/{name}", shard_bytes(members))
    samples = sum(name.endswith(f".{layout.LATENT_KEY}") for members in shards for name, _ in members)
    manifest = {
        **(encoder_records or builtin_encoder_records()),
        "latent_shape": list(LATENT_SHAPE),
        "text_embedding_shape": list(TEXT_SHAPE),
        "latent_storage": "distribution" if encode.store_distribution else "mode",
        "flip_copies": encode.flip_copies,
        "members": latent_members(encode),
        "samples": samples,
        "shards": names,
        "empty_caption_embedding": to_base64_npy(np.zeros(TEXT_SHAPE, np.float16)),
        **(manifest_fields or {}),
    }
    manifest["latent_shards"] = latent_shard_entries(names, shards, manifest)
    run.write_json(layout.ENCODE_MANIFEST, manifest)
    return run


def optional_latents(latent: np.ndarray, rng: np.random.Generator, encode: EncodeConfig) -> dict[str, np.ndarray]:
    """The std and mirrored members `encode`'s options add to a sample whose mean is `latent`
    (no random draw without store_distribution, so plain runs keep their data)."""
    arrays = {}
    if encode.store_distribution:
        arrays[layout.LATENT_STD_KEY] = rng.uniform(0.05, 0.2, LATENT_SHAPE).astype(np.float16)
    if encode.flip_copies:
        arrays[layout.LATENT_FLIP_KEY] = latent[..., ::-1].copy()
        if encode.store_distribution:
            arrays[layout.LATENT_FLIP_STD_KEY] = arrays[layout.LATENT_STD_KEY][..., ::-1].copy()
    return arrays


def write_latent_run(
    root,
    shards: int = 4,
    per_shard: int = 32,
    seed: int = 0,
    encode: EncodeConfig | None = None,
    encoder_records: dict | None = None,
) -> RunDir:
    """A run directory whose encode stage is done: latents carry a caption-dependent pattern,
    so a UNet can learn something; text embeddings are random per caption. `encode` picks the
    options (store_distribution, flip_copies) whose members are written too."""
    encode = encode or EncodeConfig()
    rng = np.random.default_rng(seed)
    captions = [f"caption {i}" for i in range(8)]
    caption_embeddings = rng.standard_normal((len(captions), *TEXT_SHAPE)).astype(np.float16)
    tars = []
    for shard in range(shards):
        members = []
        for index in range(per_shard):
            which = int(rng.integers(len(captions)))
            latent = (rng.standard_normal(LATENT_SHAPE) * 0.3 + which / 4 - 1).astype(np.float16)
            extra = optional_latents(latent, rng, encode)
            members += sample_members(f"{shard:05d}{index:04d}", latent, caption_embeddings[which], captions[which], extra)
        tars.append(members)
    return write_encode_output(root, tars, encode, encoder_records)
