"""Training on aspect-ratio buckets (train.bucket_order): reading latents of several shapes, and the
batch order: one bucket per batch, every rank in step, deterministic, resumable at a position."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
from synthetic_latents import TEXT_SHAPE, sample_members, write_encode_output

from pipeline.core import layout
from train.bucket_order import BucketOrder, make_order
from train.data import load_latent_data

# shard sizes and buckets: two raw shards, each split by bucket, plus a bucket with a single sample.
SIZES = (13, 7, 10, 9, 6, 1)
BUCKETS = ("64x64", "96x48", "64x64", "96x48", "48x96", "48x96")


def epoch_batches(order: BucketOrder, epoch: int) -> list[list[list[tuple[int, int]]]]:
    """Each rank's batches of `epoch`, through `batches()` as the training loop takes them."""
    steps = order.plan(epoch).steps
    return [[position.samples for position in islice(order.batches(rank, epoch), steps)] for rank in range(order.world_size)]


def test_every_batch_holds_one_bucket_every_rank_takes_the_same_steps_and_leftovers_are_counted():
    order = BucketOrder(SIZES, BUCKETS, world_size=2, batch_size=4, seed=0)
    for epoch in range(4):
        plan = order.plan(epoch)
        by_rank = epoch_batches(order, epoch)
        # 64x64: 23 samples -> 5 batches (3 left), 96x48: 16 -> 4 (0), 48x96: 7 -> 1 (3); 10 batches, 5 per rank.
        assert plan.batches_by_bucket == {"48x96": 1, "64x64": 5, "96x48": 4}
        assert plan.dropped_by_bucket == {"48x96": 3, "64x64": 3, "96x48": 0}
        assert plan.steps == 5 and [len(batches) for batches in by_rank] == [5, 5]
        seen = [sample for batches in by_rank for batch in batches for sample in batch]
        assert len(seen) == len(set(seen)) == sum(SIZES) - plan.samples_dropped
        for batches in by_rank:
            assert all(len(batch) == 4 and len({BUCKETS[shard] for shard, _ in batch}) == 1 for batch in batches)
    three_ranks = BucketOrder(SIZES, BUCKETS, world_size=3, batch_size=4, seed=0).plan(0)
    assert three_ranks.steps == 3 and three_ranks.samples_dropped == 6 + 1 * 4  # one whole batch sits out


def test_the_order_is_a_function_of_seed_epoch_and_rank():
    def first(seed, rank):
        return [p.samples for p in islice(BucketOrder(SIZES, BUCKETS, 2, 4, seed).batches(rank), 12)]

    assert first(0, 0) == first(0, 0) and first(0, 1) == first(0, 1)
    assert first(0, 0) != first(1, 0) and first(0, 0) != first(0, 1)
    order = BucketOrder(SIZES, BUCKETS, 2, 4, 0)
    assert epoch_batches(order, 0) != epoch_batches(order, 1)  # every epoch reshuffles


def test_resuming_at_epoch_and_batch_continues_the_same_order():
    order = BucketOrder(SIZES, BUCKETS, world_size=2, batch_size=4, seed=5)  # 5 batches per epoch
    for rank in range(2):
        uninterrupted = list(islice(order.batches(rank), 14))
        for cut in (1, 5, 6, 11):
            at = uninterrupted[cut - 1]  # what train_state.json records: (epoch, index + 1)
            assert list(islice(order.batches(rank, at.epoch, at.index + 1), 14 - cut)) == uninterrupted[cut:]


def test_too_few_full_batches_for_the_workers_fails_naming_the_key():
    with pytest.raises(ValueError, match="train.batch_size_per_worker = 8"):
        BucketOrder((9, 7), ("64x64", "96x48"), world_size=2, batch_size=8, seed=0)


def test_latents_of_several_shapes_load_as_one_shard_per_raw_shard_and_bucket(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"64x64": (4, 8, 8), "96x48": (4, 6, 12), "48x96": (4, 12, 6)}
    text = np.zeros(TEXT_SHAPE, np.float16)
    tars = []
    for shard in range(2):
        members = []
        for index, bucket in enumerate(["96x48", "64x64", "96x48", "48x96", "64x64"]):
            latent = rng.standard_normal(shapes[bucket]).astype(np.float16)
            members += sample_members(f"{shard}{index:03d}", latent, text, "c")
        members += sample_members(f"{shard}bad", np.zeros((4, 5, 5), np.float16), text, "c")  # no bucket's shape
        tars.append(members)
    run = write_encode_output(tmp_path, tars)
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    run.write_json(
        layout.ENCODE_MANIFEST, {**manifest, "buckets": [[64, 64], [96, 48], [48, 96]], "bucket_latent_shapes": shapes}
    )

    data = load_latent_data(run)

    assert data.bucketed and data.latent_shape == (4, 8, 8)
    assert [(s.name, s.bucket, len(s)) for s in data.shards] == [
        ("00000:48x96", "48x96", 1),
        ("00000:64x64", "64x64", 2),
        ("00000:96x48", "96x48", 2),
        ("00001:48x96", "48x96", 1),
        ("00001:64x64", "64x64", 2),
        ("00001:96x48", "96x48", 2),
    ]
    assert data.counts()["incomplete_samples"] == 2
    for shard in data.shards:
        assert shard.latents[layout.LATENT_KEY].shape[1:] == shapes[shard.bucket]
    order = make_order(data, world_size=2, batch_size=2, seed=0)
    assert isinstance(order, BucketOrder)
    for position in islice(order.batches(rank=1), 6):
        bucket = data.shards[position.samples[0][0]].bucket
        assert data.batch(position.samples)["latents"].shape == (2, *shapes[bucket])


def test_class_labels_travel_with_bucketed_latents_into_batches(tmp_path):
    """encode.class_field with encode.buckets: each sample's KEY.cls reaches its batch; a bad label is incomplete."""
    shapes = {"64x64": (4, 8, 8), "96x48": (4, 6, 12)}
    text = np.zeros(TEXT_SHAPE, np.float16)
    members, labels = [], {}
    for index, bucket in enumerate(["96x48", "64x64"] * 4):
        key, label = f"0{index:03d}", index % 3
        latent = np.full(shapes[bucket], index, np.float16)  # the latent says which sample it is
        members += sample_members(key, latent, text, "c") + [(f"{key}.{layout.CLASS_KEY}", str(label).encode())]
        labels[index] = label
    members += sample_members("0bad", np.zeros(shapes["64x64"], np.float16), text, "c") + [(f"0bad.{layout.CLASS_KEY}", b"7")]
    run = write_encode_output(tmp_path, [members, []])
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    run.write_json(
        layout.ENCODE_MANIFEST,
        {
            **manifest,
            "buckets": [[64, 64], [96, 48]],
            "bucket_latent_shapes": shapes,
            "class_field": "shape",
            "classes": ["circle", "square", "triangle"],
        },
    )

    data = load_latent_data(run)

    assert data.classes == ["circle", "square", "triangle"] and data.counts()["incomplete_samples"] == 1  # label 7 of 3
    for shard in data.shards:
        assert shard.class_labels is not None and len(shard.class_labels) == len(shard)
    order = make_order(data, world_size=1, batch_size=2, seed=0)
    for position in islice(order.batches(rank=0), 4):
        batch = data.batch(position.samples)
        sample_ids = batch["latents"][:, 0, 0, 0].int().tolist()
        assert batch["class_labels"].tolist() == [labels[i] for i in sample_ids]
