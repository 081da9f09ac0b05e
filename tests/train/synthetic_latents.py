"""A synthetic encode-stage output: latent shards and a manifest, no VAE or text encoder."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np

from pipeline import layout
from pipeline.arrays import to_base64_npy, to_npy_bytes
from pipeline.rundir import RunDir

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


def sample_members(key: str, latent: np.ndarray, text: np.ndarray, caption: str) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{layout.LATENT_KEY}", to_npy_bytes(latent)),
        (f"{key}.{layout.TEXT_EMBEDDING_KEY}", to_npy_bytes(text)),
        (f"{key}.{layout.META_KEY}", json.dumps({"caption": caption}).encode()),
    ]


def write_latent_run(root, shards: int = 4, per_shard: int = 32, seed: int = 0) -> RunDir:
    """A run directory whose encode stage is done: latents carry a caption-dependent pattern,
    so a UNet can learn something; text embeddings are random per caption."""
    rng = np.random.default_rng(seed)
    run = RunDir(root)
    captions = [f"caption {i}" for i in range(8)]
    caption_embeddings = rng.standard_normal((len(captions), *TEXT_SHAPE)).astype(np.float16)
    for shard in range(shards):
        members = []
        for index in range(per_shard):
            which = int(rng.integers(len(captions)))
            latent = (rng.standard_normal(LATENT_SHAPE) * 0.3 + which / 4 - 1).astype(np.float16)
            members += sample_members(f"{shard:05d}{index:04d}", latent, caption_embeddings[which], captions[which])
        run.write_bytes(f"{layout.ENCODE_SHARDS}/{shard:05d}.tar", shard_bytes(members))
    run.write_json(
        layout.ENCODE_MANIFEST,
        {
            "latent_shape": list(LATENT_SHAPE),
            "text_embedding_shape": list(TEXT_SHAPE),
            "samples": shards * per_shard,
            "empty_caption_embedding": to_base64_npy(np.zeros(TEXT_SHAPE, np.float16)),
        },
    )
    return run
