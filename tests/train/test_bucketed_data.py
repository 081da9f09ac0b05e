"""Reading latents of several shapes (encode.buckets) into batches of one bucket (train.data);
the order of bucketed batches is tested with the rest of the order (test_order.py)."""

from __future__ import annotations

from itertools import islice

import numpy as np
from synthetic_latents import TEXT_SHAPE, sample_members, write_encode_output

from pipeline.core import layout
from train.data import load_latent_data
from train.order import DataOrder


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
    run = write_encode_output(
        tmp_path, tars, manifest_fields={"buckets": [[64, 64], [96, 48], [48, 96]], "bucket_latent_shapes": shapes}
    )

    data = load_latent_data(run)

    assert data.spec.bucketed and data.spec.latent_shape == (4, 8, 8)
    assert [(s.name, s.bucket, len(s)) for shard in data.shards for s in shard.by_bucket.values()] == [
        ("00000:48x96", "48x96", 1),
        ("00000:64x64", "64x64", 2),
        ("00000:96x48", "96x48", 2),
        ("00001:48x96", "48x96", 1),
        ("00001:64x64", "64x64", 2),
        ("00001:96x48", "96x48", 2),
    ]
    assert data.counts()["incomplete_samples"] == 2
    for shard in data.shards:
        for bucket, part in shard.by_bucket.items():
            assert part.latents[layout.LATENT_KEY].shape[1:] == shapes[bucket]
    order = DataOrder(data.spec.shard_counts, streams=2, window=2, seed=0)
    for position in islice(order.batches(1, 2, 2), 6):
        shapes_in_batch = {tuple(data.batch([sample])["latents"].shape[1:]) for sample in position.samples}
        assert len(shapes_in_batch) == 1
        assert data.batch(position.samples)["latents"].shape == (2, *shapes_in_batch.pop())


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
    fields = {
        "buckets": [[64, 64], [96, 48]],
        "bucket_latent_shapes": shapes,
        "class_field": "shape",
        "classes": ["circle", "square", "triangle"],
    }
    run = write_encode_output(tmp_path, [members, members[:0]], manifest_fields=fields)

    data = load_latent_data(run)

    assert data.spec.classes == ["circle", "square", "triangle"]
    assert data.counts()["incomplete_samples"] == 1 and data.counts()["replaced_samples"] == 1  # label 7 of 3
    for part in data.shards[0].by_bucket.values():
        assert part.class_labels is not None and len(part.class_labels) == len(part)
    order = DataOrder(data.spec.shard_counts[:1], streams=1, window=1, seed=0)
    for position in islice(order.batches(0, 1, 2), 4):
        batch = data.batch(position.samples)
        sample_ids = batch["latents"][:, 0, 0, 0].int().tolist()
        assert batch["class_labels"].tolist() == [labels[i] for i in sample_ids]
