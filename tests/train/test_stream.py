"""Streaming latent shards to a rank (train.stream): the batches of the in-memory reader, from local
disk or S3, holding at most two windows of shards and reading only the shards the rank uses."""

from __future__ import annotations

from itertools import islice

import torch
from synthetic_latents import write_latent_run

from pipeline.core import layout
from pipeline.core.config import EncodeConfig
from pipeline.core.rundir import RunDir
from train import stream as stream_module
from train.data import load_latent_data, read_spec
from train.order import DataOrder
from train.stream import ShardStream


def assert_same_batches(run: RunDir, order: DataOrder, rank: int, world: int, steps: int) -> ShardStream:
    data, stream = load_latent_data(run), ShardStream(run, read_spec(run))
    for position in islice(order.batches(rank, world, 8), steps):
        streamed = stream.batch(position, torch.Generator().manual_seed(position.taken))
        in_memory = data.batch(position.samples, torch.Generator().manual_seed(position.taken))
        assert streamed.keys() == in_memory.keys()
        for name, tensor in streamed.items():
            assert torch.equal(tensor, in_memory[name]), name
    return stream


def test_streamed_batches_are_the_in_memory_ones_with_the_same_draws(tmp_path):
    run = write_latent_run(tmp_path / "run", shards=6, per_shard=16, encode=EncodeConfig(flip_copies=True))
    order = DataOrder(read_spec(run).shard_counts, streams=2, window=2, seed=3)
    stream = assert_same_batches(run, order, rank=1, world=2, steps=20)  # past an epoch's end
    assert stream.counts()["incomplete_samples"] == 0


def test_a_rank_holds_at_most_two_windows_and_reads_only_its_own_shards(tmp_path, monkeypatch):
    run = write_latent_run(tmp_path / "run", shards=16, per_shard=8)
    spec = read_spec(run)
    order = DataOrder(spec.shard_counts, streams=2, window=2, seed=0)
    steps = order.plan(0, 2, 8).steps
    read: list[int] = []
    original = stream_module.read_shard
    monkeypatch.setattr(stream_module, "read_shard", lambda r, s, entry: read.append(entry.name) or original(r, s, entry))

    stream = ShardStream(run, spec)
    positions = list(islice(order.batches(0, 2, 8), steps))
    for position in positions:
        stream.batch(position)
    stream.close()
    mine = {spec.shards[shard].name for shard in order.stream_shards(0)[0][0]}
    assert set(read) == mine and len(read) == len(mine)  # its own stream's 8 shards, each read once
    assert stream.peak_held <= 2 * 2  # the current window and the next


def test_shards_stream_from_s3(tmp_path, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="stream-shards")
    local = write_latent_run(tmp_path / "run", shards=4, per_shard=16)
    remote = RunDir("s3://stream-shards/run")
    for relative in [layout.ENCODE_MANIFEST, *(f"{layout.ENCODE_SHARDS}/{n}" for n in local.list(layout.ENCODE_SHARDS))]:
        remote.write_bytes(relative, local.read_bytes(relative))
    order = DataOrder(read_spec(remote).shard_counts, streams=2, window=2, seed=1)
    stream = assert_same_batches(remote, order, rank=0, world=2, steps=4)
    assert stream.counts()["shards"] >= 1


def test_batches_are_fp16_until_the_device(tmp_path):
    run = write_latent_run(tmp_path / "run", shards=2, per_shard=8)
    stream = ShardStream(run, read_spec(run))
    batch = stream.batch(next(DataOrder(read_spec(run).shard_counts, 1, 2, 0).batches(0, 1, 4)))
    assert batch["latents"].dtype == batch["text_embeddings"].dtype == torch.float16
