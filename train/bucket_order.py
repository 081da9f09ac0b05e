"""Training on aspect-ratio buckets (encode.buckets): one bucket per micro-batch, exact resume.

Latents then come in one shape per bucket. They are read as one `LatentShard` per (raw shard,
bucket), and the order deals batches, not shards (every worker holds all the data anyway):

1. per epoch and bucket, that bucket's samples (all shards', in shard order) are shuffled,
   seeded by (seed, epoch, bucket number), and cut into batches; the remainder (fewer than a
   batch) sits the epoch out;
2. every bucket's batches are shuffled together, seeded by (seed, epoch), and dealt to ranks
   round-robin; the last (batches % world size) sit the epoch out, so every rank takes the
   same number of steps (a rank that ran out early would hang the others' collectives).
What is left out is counted (`BucketPlan.samples_dropped`, `dropped_by_bucket`). The order is a
pure function of (seed, epoch, rank, world size) and a position is still (epoch, batch index),
so `train.checkpoint.TrainState` and resume work unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.core import layout
from pipeline.core.arrays import from_npy_bytes
from pipeline.core.rundir import RunDir
from train.data import BatchPosition, DataOrder, LatentData, LatentShard, decode_sample, parts_by_raw_shard, read_tar_members


def read_bucketed_shards(
    run: RunDir, names: list[str], manifest: dict, text_shape: tuple, members: tuple[str, ...], class_count: int | None = None
) -> list[LatentShard]:
    """One shard per (raw shard, bucket), samples sorted by key; a sample whose latent has no
    bucket's shape (or, with `class_count`, no valid class label) counts as incomplete (on the raw
    shard's first bucket shard)."""
    wanted = {*members, layout.TEXT_EMBEDDING_KEY, *([layout.CLASS_KEY] if class_count is not None else [])}
    bucket_of_shape = {tuple(shape): name for name, shape in manifest["bucket_latent_shapes"].items()}
    shards = []
    for raw_shard, parts in sorted(parts_by_raw_shard(names).items()):
        by_bucket: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {}
        incomplete, truncated = 0, False
        for name in parts:
            samples, cut = read_tar_members(io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}")), wanted)
            truncated |= cut
            for key, sample_parts in samples.items():
                shape = _latent_shape(sample_parts)
                arrays = (
                    decode_sample(sample_parts, members, shape, text_shape, class_count) if shape in bucket_of_shape else None
                )
                if arrays is None:
                    incomplete += 1
                    continue
                by_bucket.setdefault(bucket_of_shape[shape], []).append((key, arrays))
        found = [
            _shard(f"{raw_shard}:{bucket}", bucket, rows, members, class_count) for bucket, rows in sorted(by_bucket.items())
        ]
        if not found:  # keeps the counts of a shard with nothing usable
            empty = {member: np.zeros((0, *manifest["latent_shape"]), np.float16) for member in members}
            labels = None if class_count is None else np.zeros(0, np.int64)
            found = [LatentShard(raw_shard, empty, np.zeros((0, *text_shape), np.float16), class_labels=labels)]
        found[0].incomplete_samples, found[0].truncated = incomplete, truncated
        shards.extend(found)
    return shards


def _latent_shape(parts: dict[str, bytes]) -> tuple | None:
    try:
        return from_npy_bytes(parts[layout.LATENT_KEY]).shape
    except (KeyError, ValueError, OSError, EOFError):
        return None


def _shard(
    name: str, bucket: str, rows: list[tuple[str, dict[str, np.ndarray]]], members: tuple[str, ...], class_count: int | None
) -> LatentShard:
    rows = sorted(rows, key=lambda row: row[0])
    labels = None if class_count is None else np.array([arrays[layout.CLASS_KEY] for _, arrays in rows], dtype=np.int64)
    return LatentShard(
        name=name,
        latents={member: np.stack([arrays[member] for _, arrays in rows]) for member in members},
        text_embeddings=np.stack([arrays[layout.TEXT_EMBEDDING_KEY] for _, arrays in rows]),
        keys=tuple(key for key, _ in rows),
        bucket=bucket,
        class_labels=labels,
    )


@dataclass(frozen=True)
class BucketPlan:
    batches_by_rank: list[list[list[tuple[int, int]]]] = field(repr=False)
    steps: int  # batches every rank takes this epoch
    samples_dropped: int  # bucket remainders plus the batches left after dealing
    batches_by_bucket: dict[str, int]
    dropped_by_bucket: dict[str, int]  # each bucket's remainder (fewer than a batch)
    shards_dropped: tuple = ()  # batches are dealt, never whole shards (the loop logs this)


@dataclass(frozen=True)
class BucketOrder:
    """The recomputable order of single-bucket batches for every rank (see the module docstring)."""

    shard_sizes: tuple[int, ...]
    shard_buckets: tuple[str, ...]
    world_size: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        plan = self.plan(0)
        if plan.steps == 0:
            raise ValueError(
                f"{sum(plan.batches_by_bucket.values())} full batch(es) of train.batch_size_per_worker = {self.batch_size} "
                f"in the buckets ({dict(zip(plan.batches_by_bucket, map(self._bucket_size, plan.batches_by_bucket)))} "
                f"samples) for {self.world_size} workers: lower train.batch_size_per_worker or train.num_workers"
            )

    def _bucket_size(self, bucket: str) -> int:
        return sum(size for size, name in zip(self.shard_sizes, self.shard_buckets) if name == bucket)

    def plan(self, epoch: int) -> BucketPlan:
        batches, made, dropped = [], {}, {}
        for number, bucket in enumerate(sorted({name for name, size in zip(self.shard_buckets, self.shard_sizes) if size})):
            samples = [
                (shard, index)
                for shard, (size, name) in enumerate(zip(self.shard_sizes, self.shard_buckets))
                if name == bucket
                for index in range(size)
            ]
            order = np.random.default_rng([self.seed, epoch, number]).permutation(len(samples))
            full = len(samples) // self.batch_size
            batches += [[samples[i] for i in order[k * self.batch_size : (k + 1) * self.batch_size]] for k in range(full)]
            made[bucket], dropped[bucket] = full, len(samples) - full * self.batch_size
        dealt = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        steps = len(batches) // self.world_size
        by_rank = [[batches[dealt[rank + self.world_size * step]] for step in range(steps)] for rank in range(self.world_size)]
        left_over = (len(batches) - steps * self.world_size) * self.batch_size
        return BucketPlan(by_rank, steps, sum(dropped.values()) + left_over, made, dropped)

    def batches(self, rank: int, epoch: int = 0, index: int = 0) -> Iterator[BatchPosition]:
        """Endless batches for `rank`, starting at batch `index` of `epoch` (past the end: next epoch)."""
        while True:
            plan = self.plan(epoch)
            for batch in range(index, plan.steps):
                yield BatchPosition(epoch, batch, plan.batches_by_rank[rank][batch])
            epoch, index = epoch + 1, 0


def make_order(data: LatentData, world_size: int, batch_size: int, seed: int) -> DataOrder | BucketOrder:
    """The data order for `data`: by bucket when it was encoded with encode.buckets, else by shard."""
    if data.bucketed:
        buckets = tuple(shard.bucket or "" for shard in data.shards)
        return BucketOrder(data.shard_sizes, buckets, world_size, batch_size, seed)
    return DataOrder(data.shard_sizes, world_size, batch_size, seed)
