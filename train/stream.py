"""Latent shards streamed to one rank: only the shards its batches need, read ahead in the background.

`train.order` says, for every micro-batch, which (shard, index) pairs a rank takes and which
shards its current and next shuffle window hold (`BatchPosition.shards_ahead`). `ShardStream`
keeps exactly those in memory: a background pool reads the next window's shards (from local
disk or any fsspec URL) while this one is trained on, and a shard is dropped once no window in
reach needs it. A rank's memory is therefore bounded by (its streams x 2 windows) x shard size,
whatever the dataset's size, and it never reads a shard none of its batches use.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter

import torch

from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir
from train.data import LatentSpec, LoadedShard, assemble, read_counts, read_shard
from train.order import BatchPosition

_logger = get_logger("train")


class ShardStream:
    """Reads and holds the shards one rank's batches need (see the module docstring)."""

    def __init__(self, run: RunDir, spec: LatentSpec, threads: int = 2, pin: bool = False):
        self.run, self.spec, self.pin = run, spec, pin
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-reader")
        self._held: dict[int, concurrent.futures.Future[LoadedShard]] = {}
        self._dropped_counts: Counter[str] = Counter()  # read_counts of the shards let go so far
        self.peak_held = 0

    def want(self, shards: list[int]) -> None:
        """Hold `shards` (reading the missing ones in the background, in order) and nothing else."""
        wanted = dict.fromkeys(shards)
        for shard in [shard for shard in self._held if shard not in wanted]:
            self._forget(self._held.pop(shard))
        for shard in wanted:
            if shard not in self._held:
                self._held[shard] = self._pool.submit(read_shard, self.run, self.spec, self.spec.shards[shard])
        self.peak_held = max(self.peak_held, len(self._held))

    def shard(self, shard: int) -> LoadedShard:
        if shard not in self._held:
            self.want([*self._held, shard])
        return self._held[shard].result()

    def batch(self, position: BatchPosition, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch at `position`: its shards held (and the next window's requested) first."""
        self.want(position.shards_ahead)
        return assemble([self.shard(shard).locate(index) for shard, index in position.samples], self.spec, generator, self.pin)

    def keys(self, position: BatchPosition) -> list[str]:
        """The sample keys the batch at `position` reads (a replaced sample: the key of the one read instead)."""
        rows = [self.shard(shard).locate(index) for shard, index in position.samples]
        return [part.keys[row] for part, row in rows]

    def counts(self) -> dict[str, int]:
        """What reading found in the shards read so far (`train.data.read_counts`)."""
        done = [future.result() for future in self._held.values() if future.done() and not future.exception()]
        totals = Counter(self._dropped_counts)
        totals.update(read_counts(done))
        return dict(totals)

    def _forget(self, future: concurrent.futures.Future[LoadedShard]) -> None:
        if not future.cancel() and not future.exception():
            loaded = future.result()
            if loaded.replaced or loaded.incomplete_samples or loaded.truncated:
                _logger.warning(
                    f"latent shard {loaded.entry.name}: {loaded.incomplete_samples} unusable sample(s)"
                    f"{', truncated' if loaded.truncated else ''}; {loaded.replaced} counted sample(s) replaced by others"
                )
            self._dropped_counts.update(read_counts([loaded]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
