"""Latent shards in memory, and the data order that makes resume exact.

The encode stage writes `RUN/encode/shards/*.tar` (webdataset: KEY.latent.npy, KEY.text.npy,
KEY.json). Every worker reads all of them into memory once (the tiny demo's 3000 samples
take ~30 MB); the order in which a rank visits them is a pure function of
(seed, epoch, rank, world size), so a checkpoint needs only (epoch, next batch index):

1. per epoch, a permutation of the shards seeded by (seed, epoch);
2. shards dealt to ranks round-robin; the remainder (shards % world size) sits the epoch out;
3. inside each shard a shuffle seeded by (seed, epoch, shard);
4. every rank takes the same number of batches: the fewest any rank can fill. What is
   left over is counted (`EpochPlan.samples_dropped`), never silently lost.

Arrays are read with `allow_pickle=False` and metadata as JSON: no pickle ever runs.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline import layout
from pipeline.arrays import from_base64_npy, from_npy_bytes
from pipeline.rundir import RunDir

# webdataset's rule: the key is the path up to the first dot of the file name.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


@dataclass
class LatentShard:
    """One shard's complete samples: latents [n, 4, h, w] and text embeddings [n, 77, D] (fp16)."""

    name: str
    latents: np.ndarray
    text_embeddings: np.ndarray
    incomplete_samples: int = 0  # a member missing, unreadable, or of the wrong shape
    truncated: bool = False  # the tar ended early; the samples before the damage are kept

    def __len__(self) -> int:
        return len(self.latents)


@dataclass
class LatentData:
    """Everything training reads from the encode stage."""

    shards: list[LatentShard]
    empty_caption_embedding: np.ndarray  # [77, D]
    latent_shape: tuple[int, ...]  # [4, h, w]
    text_embedding_shape: tuple[int, ...]  # [77, D]

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(shard) for shard in self.shards)

    @property
    def cross_attention_dim(self) -> int:
        return self.text_embedding_shape[-1]

    @property
    def sample_size(self) -> int:
        return self.latent_shape[-1]

    def batch(self, samples: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Stack (shard, index) pairs into float32 tensors `latents` and `text_embeddings`."""
        latents = np.stack([self.shards[shard].latents[index] for shard, index in samples])
        text = np.stack([self.shards[shard].text_embeddings[index] for shard, index in samples])
        return {
            "latents": torch.from_numpy(latents.astype(np.float32)),
            "text_embeddings": torch.from_numpy(text.astype(np.float32)),
        }

    def counts(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "samples": sum(self.shard_sizes),
            "incomplete_samples": sum(shard.incomplete_samples for shard in self.shards),
            "truncated_shards": sum(shard.truncated for shard in self.shards),
        }


def load_latent_data(run: RunDir) -> LatentData:
    """Read the encode manifest and every latent shard of `run`."""
    if not run.exists(layout.ENCODE_MANIFEST):
        raise FileNotFoundError(f"{run.path(layout.ENCODE_MANIFEST)} is missing: run the encode stage first")
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    latent_shape = tuple(manifest["latent_shape"])
    text_shape = tuple(manifest["text_embedding_shape"])
    empty = from_base64_npy(manifest["empty_caption_embedding"])
    if tuple(empty.shape) != text_shape:
        raise ValueError(f"empty_caption_embedding has shape {list(empty.shape)}, expected {list(text_shape)}")
    names = run.list(layout.ENCODE_SHARDS, suffix=".tar")
    if not names:
        raise FileNotFoundError(f"no latent shards (*.tar) under {run.path(layout.ENCODE_SHARDS)}")
    shards = []
    for name in names:
        data = io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}"))
        shards.append(read_latent_shard(data, name, latent_shape, text_shape))
    return LatentData(shards, empty.astype(np.float16), latent_shape, text_shape)


def read_latent_shard(handle, name: str, latent_shape: tuple, text_shape: tuple) -> LatentShard:
    """Complete, well-shaped, finite samples of one tar, in the order they appear."""
    members: dict[str, dict[str, bytes]] = {}
    truncated = False
    try:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, suffix = match.groups()
                if suffix in (layout.LATENT_KEY, layout.TEXT_EMBEDDING_KEY):
                    members.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        truncated = True
    latents, texts, incomplete = [], [], 0
    for parts in members.values():
        arrays = _decode(parts, latent_shape, text_shape)
        if arrays is None:
            incomplete += 1
            continue
        latents.append(arrays[0])
        texts.append(arrays[1])
    return LatentShard(
        name=name,
        latents=np.stack(latents) if latents else np.zeros((0, *latent_shape), np.float16),
        text_embeddings=np.stack(texts) if texts else np.zeros((0, *text_shape), np.float16),
        incomplete_samples=incomplete,
        truncated=truncated,
    )


def _decode(parts: dict[str, bytes], latent_shape: tuple, text_shape: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        latent = from_npy_bytes(parts[layout.LATENT_KEY])
        text = from_npy_bytes(parts[layout.TEXT_EMBEDDING_KEY])
    except (KeyError, ValueError, OSError, EOFError):
        return None
    if latent.shape != latent_shape or text.shape != text_shape:
        return None
    if not (np.isfinite(latent).all() and np.isfinite(text).all()):
        return None
    return latent.astype(np.float16), text.astype(np.float16)


# -- data order ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPosition:
    """Where a batch sits in the order, and the (shard, index) pairs it holds."""

    epoch: int
    index: int
    samples: list[tuple[int, int]] = field(repr=False)


@dataclass(frozen=True)
class EpochPlan:
    shards_by_rank: list[list[int]]
    shards_dropped: list[int]
    steps: int  # batches every rank takes this epoch
    samples_dropped: int  # samples no rank sees this epoch (dropped shards and uneven tails)


@dataclass(frozen=True)
class DataOrder:
    """The recomputable order of batches for every rank (see the module docstring)."""

    shard_sizes: tuple[int, ...]
    world_size: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.shard_sizes) < self.world_size:
            raise ValueError(
                f"{len(self.shard_sizes)} latent shard(s) for {self.world_size} training workers: every worker "
                "needs at least one shard per epoch. Encode into more shards (lower ingest.samples_per_shard) "
                "or use fewer train.num_workers."
            )
        if self.plan(0).steps == 0:
            raise ValueError(
                f"no rank can fill one batch of {self.batch_size} from its shards "
                f"(shard sizes {list(self.shard_sizes)}, {self.world_size} workers): lower train.batch_size_per_worker"
            )

    def plan(self, epoch: int) -> EpochPlan:
        world, shards = self.world_size, len(self.shard_sizes)
        permutation = np.random.default_rng([self.seed, epoch]).permutation(shards).tolist()
        dealt = shards - shards % world
        by_rank = [permutation[rank:dealt:world] for rank in range(world)]
        samples_per_rank = [sum(self.shard_sizes[shard] for shard in ranked) for ranked in by_rank]
        steps = min(samples_per_rank) // self.batch_size
        used = steps * self.batch_size * world
        return EpochPlan(by_rank, permutation[dealt:], steps, sum(self.shard_sizes) - used)

    def rank_samples(self, epoch: int, rank: int) -> list[tuple[int, int]]:
        """(shard, index) pairs rank `rank` visits in `epoch`, before cutting into batches."""
        samples = []
        for shard in self.plan(epoch).shards_by_rank[rank]:
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(self.shard_sizes[shard])
            samples.extend((shard, int(index)) for index in order)
        return samples

    def batches(self, rank: int, epoch: int = 0, index: int = 0) -> Iterator[BatchPosition]:
        """Endless batches for `rank`, starting at batch `index` of `epoch` (past the end: next epoch)."""
        while True:
            steps = self.plan(epoch).steps
            if steps == 0:
                raise ValueError(f"epoch {epoch}: no rank can fill a batch of {self.batch_size}")
            samples = self.rank_samples(epoch, rank)
            for batch in range(index, steps):
                yield BatchPosition(epoch, batch, samples[batch * self.batch_size : (batch + 1) * self.batch_size])
            epoch, index = epoch + 1, 0
