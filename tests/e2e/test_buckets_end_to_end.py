"""Aspect-ratio buckets for real: non-square toy images through the Ray Data encode stage
(encode.buckets = 'auto') and Ray Train + DeepSpeed on 2 workers, then an exact resume."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from webdataset import TarWriter

from ingest.encode import stage as encode
from pipeline.core import layout
from pipeline.core.arrays import from_npy_bytes
from pipeline.core.buckets import bucket_name, nearest_bucket
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate
from train.data import load_latent_data
from train.order import DataOrder
from train.stage import run_stage as train

# An end-to-end run of `make test-e2e`, not of `make test` (which runs tests/e2e/test_end_to_end.py only).
pytestmark = pytest.mark.e2e

RATIOS = [1.0, 1.6, 0.625, 2.0, 0.5]
OVERRIDES = [
    "ingest.resize_mode='keep_ratio'",
    "encode.buckets='auto'",
    "encode.batch_size=16",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.batch_size_per_worker=8",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.warmup_steps=0",
    "train.lr_schedule='constant'",
    "train.log_every=1",
]


def write_raw_toy_shard(run: RunDir, number: int, count: int) -> dict[str, tuple[int, int]]:
    """A raw shard of non-square toy images as img2dataset leaves them with resize_mode 'keep_ratio'
    (their shape kept: tests/pipeline/core/test_buckets.py); returns each key's image size."""
    sizes, buffer = {}, io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for index, (spec, image) in enumerate(generate(count, 64, number, aspect_ratios=RATIOS)):
            key, data = f"{number}{index:04d}", io.BytesIO()
            image.save(data, format="JPEG", quality=95)
            writer.write({"__key__": key, "jpg": data.getvalue(), "txt": spec.caption.encode(), "json": b"{}"})
            sizes[key] = image.size
    run.write_bytes(f"{layout.INGEST_SHARDS}/{number:05d}.tar", buffer.getvalue())
    run.write_json(f"{layout.INGEST_SHARDS}/{number:05d}{layout.SHARD_STATS_SUFFIX}", {"successes": count})
    run.write_json(f"{layout.INGEST_SHARDS}/{number:05d}{layout.SHARD_OUTCOME_SUFFIX}", {"shard": number, "succeeded": count})
    return sizes


def losses(run: RunDir) -> list[float]:
    return [json.loads(line)["loss"] for line in run.read_text(layout.TRAIN_METRICS).splitlines()]


def test_buckets_encode_by_shape_train_one_bucket_per_batch_and_resume_exactly(tmp_path, ray_local):
    config = load_config("tiny", overrides=OVERRIDES)
    run = RunDir(tmp_path)
    sizes = {**write_raw_toy_shard(run, 0, 60), **write_raw_toy_shard(run, 1, 60)}

    encode.run_stage(config, run)

    manifest = run.read_json(layout.ENCODE_MANIFEST)
    expected = {key: nearest_bucket(*size, config.encode.buckets) for key, size in sizes.items()}
    assert manifest["bucket_counts"] == {bucket_name(b): list(expected.values()).count(b) for b in config.encode.buckets}
    assert manifest["cropped_share"] < 0.05 and manifest["square_cropped_share"] > 0.3
    for name in run.list(layout.ENCODE_SHARDS, ".tar"):
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}"))) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    key = member.name.split(".")[0]
                    meta = json.loads(archive.extractfile(member).read())
                    (width, height) = expected[key]
                    assert meta["bucket"] == [width, height] and meta["original_size"] == list(sizes[key])
                    latent = from_npy_bytes(archive.extractfile(f"{key}.{layout.LATENT_KEY}").read())
                    assert latent.shape == (4, height // 8, width // 8)

    data = load_latent_data(run)
    order = DataOrder(data.spec.shard_counts, 2, config.train.shuffle_window_shards, config.seed)
    assert order.bucketed and order.check(2, 8).steps >= 4
    for rank in range(2):  # what the workers take: one bucket per micro-batch (stacking would fail otherwise)
        for position, _ in zip(order.batches(rank, 2, 8), range(4)):
            assert len({data.shards[shard].locate(index)[0].bucket for shard, index in position.samples}) == 1

    train(config, run)
    straight = losses(run)
    assert len(straight) == 4 and all(loss > 0 for loss in straight)

    # Take the run back to its step-2 checkpoint and train to 4 again: it must resume exactly. Ray
    # Train's own record of the checkpoints goes too (resume reads only the COMMITTED markers).
    for folder in (layout.TRAIN_CHECKPOINTS, layout.TRAIN_EXPORT):
        run.remove(f"{folder}/{layout.step_name(4)}")
    run.remove(f"{layout.TRAIN_CHECKPOINTS}/checkpoint_manager_snapshot.json")
    train(config, run)
    assert run.read_json(layout.TRAIN_RESUMES)[-1]["step"] == 2
    assert losses(run) == pytest.approx(straight, rel=1e-5)
