"""The data order (train.order): a pure function of the shards' counts, the same whatever the world
size, each rank reading only its streams' shards, buckets one per batch, resumable at a position."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from train.order import DataOrder, OrderError, ShardCounts


def plain(*sizes: int, streams: int = 2, window: int = 2, seed: int = 0) -> DataOrder:
    return DataOrder(tuple(ShardCounts(size) for size in sizes), streams, window, seed)


def epoch_samples(order: DataOrder, epoch: int, world: int, batch: int) -> list[tuple[int, int]]:
    """Every (shard, index) any rank trains on in `epoch`, all ranks' batches of each step in turn."""
    steps = order.plan(epoch, world, batch).steps
    by_rank = [list(islice(order.batches(rank, world, batch, epoch), steps)) for rank in range(world)]
    assert all(position.epoch == epoch for positions in by_rank for position in positions)
    return [sample for step in zip(*by_rank) for position in step for sample in position.samples]


def test_same_counts_give_the_same_order_and_another_seed_does_not():
    def first(seed):
        return [p.samples for p in islice(plain(16, 16, 16, 16, seed=seed).batches(1, 2, 4), 10)]

    assert first(0) == first(0) and first(0) != first(1)


def test_every_sample_once_per_epoch_and_epochs_reshuffle():
    order = plain(8, 8, 8, 8)
    for epoch in range(3):
        seen = epoch_samples(order, epoch, world=2, batch=4)
        assert sorted(seen) == [(shard, index) for shard in range(4) for index in range(8)]
        assert order.plan(epoch, 2, 4).samples_dropped == 0
    assert epoch_samples(order, 0, 2, 4) != epoch_samples(order, 1, 2, 4)


def test_a_batch_mixes_the_shards_of_a_window():
    order = plain(*[50] * 8, streams=2, window=4)
    position = next(order.batches(0, 2, 32))
    assert len({shard for shard, _ in position.samples}) >= 3


def test_remainder_shards_and_uneven_tails_are_dropped_and_counted():
    sizes = (10, 7, 9, 12, 5)
    order = plain(*sizes)
    for epoch in range(4):
        plan = order.plan(epoch, 2, 4)
        seen = epoch_samples(order, epoch, 2, 4)
        assert len(seen) == len(set(seen)) == plan.steps * 4 * 2  # no repeats; ranks in step
        assert len(plan.shards_dropped) == 1
        assert plan.samples_dropped == sum(sizes) - len(seen)
        assert not {shard for shard, _ in seen} & set(plan.shards_dropped)


def test_resuming_at_a_position_continues_the_same_order():
    order = plain(6, 6, 6, 6, 6, 6)
    uninterrupted = list(islice(order.batches(0, 2, 4), 10))
    for cut in (1, 3, 4, 8):
        at = uninterrupted[cut - 1]  # the last batch before the checkpoint: train_state.json keeps (epoch, next_taken)
        assert list(islice(order.batches(0, 2, 4, at.epoch, at.next_taken), 10 - cut)) == uninterrupted[cut:]


def test_each_rank_reads_only_its_own_streams_shards():
    order = plain(*[12] * 16, streams=4, window=2)
    for world in (1, 2, 4):
        steps = order.plan(0, world, 8).steps  # within an epoch: the next one deals the shards anew
        positions = [list(islice(order.batches(rank, world, 8), steps)) for rank in range(world)]
        read = [{shard for position in by_rank for shard in position.shards_ahead} for by_rank in positions]
        assert all(not read[a] & read[b] for a in range(world) for b in range(a + 1, world))
        assert sum(map(len, read)) == 16
        for position in (position for by_rank in positions for position in by_rank):
            assert {shard for shard, _ in position.samples} <= set(position.shards_ahead)


def test_another_world_size_resumes_on_the_same_samples_nothing_skipped_or_repeated():
    """W=2, then W=1 from its position, then W=2 again: the epoch's samples, each exactly once."""
    order = plain(*[24] * 8, streams=2, window=2, seed=4)  # two streams of 96 samples
    seen, epoch, taken = Counter(), 0, 0
    for world, steps in ((2, 3), (1, 6), (2, 100)):  # 8 samples per stream and step at W=2, 4 at W=1
        batch = 8
        for _ in range(steps):
            positions = [next(order.batches(rank, world, batch, epoch, taken)) for rank in range(world)]
            if positions[0].epoch != 0:
                break
            seen.update(sample for position in positions for sample in position.samples)
            epoch, taken = positions[0].epoch, positions[0].next_taken
    assert set(seen.values()) == {1} and len(seen) == 8 * 24


def test_a_world_that_cannot_split_the_streams_is_refused_naming_the_keys():
    order = plain(*[24] * 8, streams=4)
    with pytest.raises(OrderError, match="train.batch_size_per_worker.*multiple of 4"):
        order.check(world=3, batch=2)
    order.check(world=3, batch=4)  # 12 samples per step: 3 from each stream
    with pytest.raises(OrderError, match="2 latent shard.*4 data streams"):
        plain(10, 10, streams=4).check(4, 1)
    with pytest.raises(OrderError, match="lower train.batch_size_per_worker"):
        plain(4, 4).check(2, 8)


# -- buckets ----------------------------------------------------------------------------------
# Six shards with per-bucket counts; samples of a shard are indexed bucket by bucket in name order.
BUCKETED = tuple(
    ShardCounts(sum(counts.values()), tuple(sorted(counts.items())))
    for counts in (
        {"64x64": 7, "96x48": 5},
        {"64x64": 6, "48x96": 3},
        {"96x48": 9},
        {"64x64": 4, "96x48": 4, "48x96": 2},
        {"64x64": 8},
        {"48x96": 6, "96x48": 1},
    )
)


def bucket_of(shard: int, index: int) -> str:
    for bucket, count in BUCKETED[shard].buckets:
        if index < count:
            return bucket
        index -= count
    raise IndexError


def test_every_bucketed_batch_holds_one_bucket_and_remainders_are_counted():
    order = DataOrder(BUCKETED, streams=2, window=3, seed=0)
    for epoch in range(3):
        plan = order.plan(epoch, 2, 4)
        seen = epoch_samples(order, epoch, 2, 4)
        assert len(seen) == len(set(seen)) == plan.steps * 8
        for start in range(0, len(seen), 4):
            assert len({bucket_of(*sample) for sample in seen[start : start + 4]}) == 1
        assert sum(plan.dropped_by_bucket.values()) <= plan.samples_dropped
        assert plan.samples_dropped == sum(shard.samples for shard in BUCKETED) - len(seen)


def test_bucketed_order_resumes_at_a_position_and_refuses_another_world_size():
    order = DataOrder(BUCKETED, streams=2, window=3, seed=5)
    uninterrupted = list(islice(order.batches(1, 2, 2), 14))
    for cut in (1, 5, 9):
        at = uninterrupted[cut - 1]
        assert list(islice(order.batches(1, 2, 2, at.epoch, at.next_taken), 14 - cut)) == uninterrupted[cut:]
    with pytest.raises(OrderError, match="one per worker.*num_workers = 2"):
        order.check(world=1, batch=4)
