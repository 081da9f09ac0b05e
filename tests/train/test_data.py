"""Latent shards in memory and the recomputable data order (train.data)."""

from __future__ import annotations

import io
from itertools import islice

import numpy as np
import pytest

from pipeline import layout
from synthetic_latents import LATENT_SHAPE, TEXT_SHAPE, sample_members, shard_bytes
from train.data import DataOrder, load_latent_data, read_latent_shard


def epoch_samples(order: DataOrder, epoch: int) -> list[tuple[int, int]]:
    """Every (shard, index) any rank trains on in `epoch`."""
    steps = order.plan(epoch).steps
    seen = []
    for rank in range(order.world_size):
        for position in islice(order.batches(rank, epoch), steps):
            assert position.epoch == epoch
            seen.extend(position.samples)
    return seen


def test_same_arguments_give_the_same_order_and_another_seed_does_not():
    def first_batches(seed):
        order = DataOrder((16, 16, 16, 16), world_size=2, batch_size=4, seed=seed)
        return [position.samples for position in islice(order.batches(rank=1), 10)]

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


def test_every_sample_once_per_epoch_across_ranks_and_epochs_reshuffle():
    order = DataOrder((8, 8, 8, 8), world_size=2, batch_size=4, seed=3)
    for epoch in range(3):
        seen = epoch_samples(order, epoch)
        assert sorted(seen) == [(shard, index) for shard in range(4) for index in range(8)]
        assert order.plan(epoch).samples_dropped == 0
    assert epoch_samples(order, 0) != epoch_samples(order, 1)


def test_remainder_shards_and_uneven_tails_are_dropped_and_counted():
    sizes = (10, 7, 9, 12, 5)
    order = DataOrder(sizes, world_size=2, batch_size=4, seed=0)
    for epoch in range(4):
        plan = order.plan(epoch)
        seen = epoch_samples(order, epoch)
        assert len(seen) == len(set(seen)) == plan.steps * 4 * 2  # no repeats; ranks in step
        assert len(plan.shards_dropped) == 1
        assert plan.samples_dropped == sum(sizes) - len(seen)
        assert not {shard for shard, _ in seen} & set(plan.shards_dropped)


def test_resuming_at_epoch_and_batch_continues_the_same_order():
    order = DataOrder((6, 6, 6, 6), world_size=2, batch_size=4, seed=7)  # 3 batches per epoch
    uninterrupted = list(islice(order.batches(rank=0), 10))
    for cut in (1, 3, 4, 8):
        at = uninterrupted[cut - 1]  # the last batch before the checkpoint
        resumed = islice(order.batches(rank=0, epoch=at.epoch, index=at.index + 1), 10 - cut)
        assert list(resumed) == uninterrupted[cut:]


def test_fewer_shards_than_workers_fails_fast():
    with pytest.raises(ValueError, match="1 latent shard.*2 training workers"):
        DataOrder((100,), world_size=2, batch_size=4, seed=0)


def test_batch_larger_than_a_rank_can_fill_fails_fast():
    with pytest.raises(ValueError, match="batch_size_per_worker"):
        DataOrder((4, 4), world_size=2, batch_size=8, seed=0)


def test_load_latent_data_reads_shards_and_manifest(latent_run):
    data = load_latent_data(latent_run)
    assert data.shard_sizes == (32, 32, 32, 32)
    assert data.latent_shape == LATENT_SHAPE and data.text_embedding_shape == TEXT_SHAPE
    assert data.cross_attention_dim == 64 and data.sample_size == 8
    assert data.empty_caption_embedding.shape == TEXT_SHAPE
    batch = data.batch([(0, 0), (3, 31)])
    assert batch["latents"].shape == (2, *LATENT_SHAPE)
    assert batch["text_embeddings"].shape == (2, *TEXT_SHAPE)
    assert data.counts()["incomplete_samples"] == 0


def test_bad_samples_and_truncated_shards_are_counted_not_fatal():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(LATENT_SHAPE).astype(np.float16)
    text = rng.standard_normal(TEXT_SHAPE).astype(np.float16)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    members = sample_members("good", latent, text, "fine")
    members += [("nolatent.text.npy", members[1][1])]  # missing its latent
    members += [("pickled.latent.npy", pickled.getvalue()), ("pickled.text.npy", members[1][1])]
    members += sample_members("wrongshape", latent[:2], text, "x")
    members += sample_members("nan", np.full(LATENT_SHAPE, np.nan, np.float16), text, "x")
    members += sample_members("last", latent, text, "fine")
    whole = shard_bytes(members)

    shard = read_latent_shard(io.BytesIO(whole), "a.tar", LATENT_SHAPE, TEXT_SHAPE)
    assert (len(shard), shard.incomplete_samples, shard.truncated) == (2, 4, False)

    cut = whole.index(b"last.text.npy")  # ends inside the last sample
    truncated = read_latent_shard(io.BytesIO(whole[:cut + 700]), "b.tar", LATENT_SHAPE, TEXT_SHAPE)
    assert truncated.truncated and len(truncated) == 1


def test_missing_encode_output_names_the_file(tmp_path):
    from pipeline.rundir import RunDir

    with pytest.raises(FileNotFoundError, match=layout.ENCODE_MANIFEST):
        load_latent_data(RunDir(tmp_path))
