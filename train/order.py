"""The order training visits latent samples in: a pure function of the shards' sample counts.

The encode manifest records how many samples each latent shard holds (`latent_shards`: one
entry per raw shard, with per-bucket counts under encode.buckets). From those counts alone,
never from the data, every rank computes the same order:

1. per epoch, a permutation of the shards seeded by (seed, epoch), dealt round-robin to a fixed
   number of *streams* P (`train.data_streams`; the first run's worker count by default);
   the remainder (shards % P) sits the epoch out;
2. each stream cuts its shards into windows of K (`train.shuffle_window_shards`) and shuffles
   each window's samples together, seeded by (seed, epoch, stream, window), so a batch mixes
   shards while a reader holds only a window or two of them;
3. every global step takes the next m = B·W/P samples of every stream (B the micro-batch, W the
   world size); laid end to end they are the step's B·W samples, and rank r takes the r-th run
   of B. With W dividing P a rank reads only its P/W streams' shards.

A position is (epoch, samples taken from each stream): it does not depend on W, so a run
checkpointed by W workers resumes with W' on the same sample (nothing skipped or repeated) as
long as B·W' is a multiple of P. An epoch ends when the shortest stream has fewer than m
samples left; what it leaves out is counted (`EpochPlan.samples_dropped`).

With encode.buckets a micro-batch must hold one bucket's latents: each window's samples are
grouped by bucket and cut into chunks of B, the chunks shuffled, and a bucket's remainder (fewer
than B) in a window sits the epoch out, counted. One stream per rank then (P = W), so bucketed
runs resume with the worker count they started with.

Seeking to a position costs O(shards) plus one window's permutation: no data is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class ShardCounts:
    """One latent shard as the order sees it (an entry of the manifest's `latent_shards`)."""

    samples: int
    buckets: tuple[tuple[str, int], ...] = ()
    """(bucket, samples) sorted by bucket under encode.buckets; empty otherwise. A shard's samples are
    indexed bucket by bucket in this order."""


@dataclass(frozen=True)
class BatchPosition:
    """One micro-batch of one rank: where it sits in the order and the (shard, index) pairs it holds."""

    epoch: int
    taken: int
    """Samples taken from each stream in this epoch before this batch."""
    next_taken: int
    """... and after it: where a checkpoint taken after this batch resumes."""
    samples: list[tuple[int, int]] = field(repr=False)
    shards_ahead: list[int] = field(repr=False, default_factory=list)
    """Shards this rank reads for this batch and the window after it, in order (what to prefetch)."""


@dataclass(frozen=True)
class EpochPlan:
    steps: int
    """Global steps the epoch holds at this world size, counted from its start."""
    shards_dropped: list[int]
    """Shards no stream holds this epoch (shards % streams)."""
    samples_dropped: int
    """Samples no rank trains on this epoch: dropped shards, streams' uneven tails and bucket remainders."""
    dropped_by_bucket: dict[str, int] = field(default_factory=dict)
    """Bucket remainders per bucket (encode.buckets)."""


class OrderError(ValueError):
    """The data cannot be ordered for this world size and batch; the message names the keys to change."""


@dataclass(frozen=True)
class DataOrder:
    """The recomputable order (see the module docstring)."""

    shards: tuple[ShardCounts, ...]
    streams: int
    window: int
    seed: int

    @cached_property
    def bucketed(self) -> bool:
        return any(shard.buckets for shard in self.shards)

    @cached_property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def chunk(self, world: int, batch: int) -> int:
        """Samples each stream gives per global step (m); raises if the world cannot split the streams."""
        if self.bucketed and world != self.streams:
            raise OrderError(
                f"bucketed latents (encode.buckets) are ordered in {self.streams} streams, one per worker: train them with "
                f"train.num_workers = {self.streams} (this attempt has {world})"
            )
        if batch * world % self.streams:
            raise OrderError(
                f"train.batch_size_per_worker ({batch}) x {world} workers = {batch * world} samples per step cannot be "
                f"split evenly over the run's {self.streams} data streams (train.data_streams): use a worker count or "
                f"batch size whose product is a multiple of {self.streams}"
            )
        return batch * world // self.streams

    def check(self, world: int, batch: int) -> EpochPlan:
        """Epoch 0's plan; raises OrderError naming the keys to change if it has no step."""
        if len(self.shards) < self.streams:
            raise OrderError(
                f"{len(self.shards)} latent shard(s) for {self.streams} data streams (train.data_streams, by default "
                "train.num_workers): every stream needs at least one shard. Encode into more shards (lower "
                "ingest.samples_per_shard) or use fewer workers."
            )
        plan = self.plan(0, world, batch)
        if plan.steps == 0:
            raise OrderError(
                f"no global step of {batch} samples per worker x {world} workers fits in the shards' {self.total_samples} "
                f"samples ({self.streams} streams of {min(self._stream_lengths(0, self.chunk(world, batch)))}+ samples): "
                "lower train.batch_size_per_worker or train.num_workers"
            )
        return plan

    # -- streams and windows, from counts ---------------------------------------------------
    def stream_shards(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """(each stream's shards in order, the shards left out) for `epoch`."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        dealt = len(permutation) - len(permutation) % self.streams
        return [permutation[stream : dealt : self.streams] for stream in range(self.streams)], permutation[dealt:]

    def _windows(self, shards: list[int]) -> list[list[int]]:
        return [shards[start : start + self.window] for start in range(0, len(shards), self.window)]

    def _window_length(self, shards: list[int], chunk: int) -> int:
        """Samples a window yields: all of them, or with buckets each bucket's whole chunks."""
        if not self.bucketed:
            return sum(self.shards[shard].samples for shard in shards)
        return sum(count // chunk * chunk for count in self._bucket_totals(shards).values())

    def _bucket_totals(self, shards: list[int]) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shard in shards:
            for bucket, count in self.shards[shard].buckets:
                totals[bucket] = totals.get(bucket, 0) + count
        return totals

    def _stream_lengths(self, epoch: int, chunk: int) -> list[int]:
        by_stream, _ = self.stream_shards(epoch)
        return [sum(self._window_length(window, chunk) for window in self._windows(shards)) for shards in by_stream]

    def plan(self, epoch: int, world: int, batch: int) -> EpochPlan:
        chunk = self.chunk(world, batch)
        by_stream, dropped_shards = self.stream_shards(epoch)
        steps = min(self._stream_lengths(epoch, chunk)) // chunk
        by_bucket: dict[str, int] = {}
        if self.bucketed:
            for shards in by_stream:
                for window in self._windows(shards):
                    for bucket, count in self._bucket_totals(window).items():
                        by_bucket[bucket] = by_bucket.get(bucket, 0) + count % chunk
        return EpochPlan(steps, dropped_shards, self.total_samples - steps * chunk * self.streams, by_bucket)

    def window_samples(self, epoch: int, stream: int, window: int, shards: list[int], chunk: int) -> np.ndarray:
        """[n, 2] (shard, index) the window yields, in order (with buckets: whole single-bucket chunks)."""
        sizes = [self.shards[shard].samples for shard in shards]
        indices = np.concatenate([np.arange(size, dtype=np.int64) for size in sizes]) if shards else np.zeros(0, np.int64)
        pairs = np.stack([np.repeat(np.asarray(shards, np.int64), sizes), indices], axis=1)
        rng = np.random.default_rng([self.seed, epoch, stream, window])
        pairs = pairs[rng.permutation(len(pairs))]
        if not self.bucketed:
            return pairs
        bucket_of = self._bucket_numbers(shards, pairs)
        chunks = []
        for number in np.unique(bucket_of):
            members = pairs[bucket_of == number]
            whole = len(members) // chunk * chunk
            chunks += np.split(members[:whole], whole // chunk) if whole else []
        order = rng.permutation(len(chunks))
        return np.concatenate([chunks[i] for i in order]) if chunks else np.zeros((0, 2), np.int64)

    def _bucket_numbers(self, shards: list[int], pairs: np.ndarray) -> np.ndarray:
        """Each pair's bucket, as a number of the sorted bucket names."""
        names = sorted({bucket for shard in shards for bucket, _ in self.shards[shard].buckets})
        number = {name: n for n, name in enumerate(names)}
        result = np.empty(len(pairs), np.int64)
        for shard in shards:
            rows = pairs[:, 0] == shard
            bounds = np.cumsum([0] + [count for _, count in self.shards[shard].buckets])
            codes = np.array([number[bucket] for bucket, _ in self.shards[shard].buckets] or [0])
            result[rows] = codes[np.searchsorted(bounds, pairs[rows, 1], side="right") - 1]
        return result

    # -- one rank's batches -------------------------------------------------------------------
    def rank_segments(self, rank: int, world: int, batch: int) -> list[tuple[int, int, int]]:
        """(stream, first, end) offsets into each stream's step slice that rank `rank` takes, in order."""
        chunk = self.chunk(world, batch)
        start, end = rank * batch, (rank + 1) * batch
        return [
            (stream, max(start - stream * chunk, 0), min(end - stream * chunk, chunk))
            for stream in range(start // chunk, (end - 1) // chunk + 1)
        ]

    def batches(self, rank: int, world: int, batch: int, epoch: int = 0, taken: int = 0) -> Iterator[BatchPosition]:
        """Endless micro-batches for `rank` from position (epoch, taken); past an epoch's end, the next epoch."""
        chunk, segments = self.chunk(world, batch), self.rank_segments(rank, world, batch)
        while True:
            steps = (min(self._stream_lengths(epoch, chunk)) - taken) // chunk
            if steps <= 0 and taken == 0:
                raise OrderError(f"epoch {epoch}: no global step of {batch} x {world} samples fits")
            by_stream, _ = self.stream_shards(epoch)
            cursors = {stream: _StreamCursor(self, epoch, stream, by_stream[stream], chunk) for stream, _, _ in segments}
            for _ in range(max(steps, 0)):
                samples, ahead = [], []
                for stream, first, end in segments:
                    samples += cursors[stream].take(taken + first, taken + end)
                    ahead += cursors[stream].shards_from(taken + first)
                yield BatchPosition(epoch, taken, taken + chunk, [(int(s), int(i)) for s, i in samples], ahead)
                taken += chunk
            epoch, taken = epoch + 1, 0


class _StreamCursor:
    """One stream's samples in one epoch, a window's permutation at a time."""

    def __init__(self, order: DataOrder, epoch: int, stream: int, shards: list[int], chunk: int):
        self.order, self.epoch, self.stream, self.chunk = order, epoch, stream, chunk
        self.windows = order._windows(shards)
        self.starts = np.cumsum([0] + [order._window_length(window, chunk) for window in self.windows])
        self._cached: dict[int, np.ndarray] = {}

    def _window_of(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right") - 1)

    def _samples(self, window: int) -> np.ndarray:
        if window not in self._cached:
            self._cached = {key: value for key, value in self._cached.items() if key >= window - 1}  # keep two at most
            self._cached[window] = self.order.window_samples(self.epoch, self.stream, window, self.windows[window], self.chunk)
        return self._cached[window]

    def take(self, first: int, end: int) -> list[np.ndarray]:
        """Samples [first, end) of the stream (may span two windows)."""
        taken = []
        while first < end:
            window = self._window_of(first)
            offset, stop = first - self.starts[window], min(end, self.starts[window + 1]) - self.starts[window]
            taken += list(self._samples(window)[offset:stop])
            first = self.starts[window] + stop
        return taken

    def shards_from(self, position: int) -> list[int]:
        """The shards of the window holding `position` and of the next one."""
        window = self._window_of(position)
        return [shard for w in range(window, min(window + 2, len(self.windows))) for shard in self.windows[w]]
