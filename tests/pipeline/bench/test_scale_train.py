"""`pipeline bench scale-train` at a tiny size: every key of its JSON is there, its numbers positive
and finite (what they should be is the bench's to report, not a test's to assert); plus the
synthetic shards it trains on, which read as encode's do."""

import json
import math

import pytest

from pipeline.bench.scale_train import SCALE, find_position, run_bench
from pipeline.bench.train import write_synthetic_latents
from pipeline.cli import BENCHES
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir
from train.data import load_latent_data

TARGETS = "train_rss_ratio_4x train_start_ratio_4x stream_vs_memory_ratio plan_seconds_100m_64 plan_mb_100m_64 resume_read_ratio"
RAW = (
    "train_setup_ratio_4x rss_mb_1x rss_mb_4x start_seconds_1x start_seconds_4x setup_seconds_1x setup_seconds_4x "
    "stream_samples_per_s memory_samples_per_s memory_load_seconds sample_bytes shard_bytes_per_sample cpu_count"
)


@pytest.mark.e2e  # about a minute: four worker processes and a 2-rank DeepSpeed checkpoint
def test_scale_train_reports_every_key_positive_and_finite():
    report = run_bench(
        images=2000,
        samples_per_shard=100,
        worker_steps=4,
        speed_steps=4,
        speed_block_steps=2,
        worker_repeats=1,
        plan_shards=100,
        plan_samples_per_shard=100,
        plan_world=8,
        plan_rank=5,
    )
    json.dumps(report)  # what the CLI prints
    assert report["bench"] == "scale-train" and BENCHES["scale-train"] == "pipeline.bench.scale_train:run_bench"
    for key in (TARGETS + " " + RAW).split():
        assert isinstance(report[key], int | float) and math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    assert 0 < report["resume_read_bytes"] < report["checkpoint_bytes"]

    assert report["samples_1x"] == 2000 and report["samples_4x"] == SCALE * 2000
    assert report["shards_1x"] == 20 and report["shards_4x"] == SCALE * 20
    assert report["text_embedding_shape"] == [77, 64] and report["latent_shape"] == [4, 8, 8]
    assert report["worker_steps"] == 4 and len(report["workers_1x"]) == len(report["workers_4x"]) == 1
    for worker in report["workers_1x"] + report["workers_4x"]:
        assert worker["start_seconds"] > worker["setup_seconds"] > 0  # the interpreter and imports come first
        assert worker["shards_trained"] >= 1 and worker["peak_held_shards"] >= worker["shards_trained"]
    assert report["speed_steps"] == 4 and report["speed_block_steps"] == 2
    assert len(report["stream_vs_memory_ratio_halves"]) == 2 and min(report["stream_vs_memory_ratio_halves"]) > 0
    assert report["plan_samples"] == 100 * 100 and report["plan_world"] == 8 and report["plan_taken"] > 0


def test_find_position_lands_half_way_through_a_stream():
    # 100 shards of 100 over 8 streams: 12 shards (1200 samples) a stream, 4 left out; each step takes
    # 32 x 8 / 8 = 32 samples of every stream, so an epoch has 37 steps and half way is after 18.
    assert find_position(100, 100, world=8, rank=5, batch=32, window=4) == 18 * 32


def test_synthetic_latents_read_as_encode_writes_them(tmp_path):
    run = RunDir(tmp_path / "run")
    shards = write_synthetic_latents(load_config("tiny"), run, 250, samples_per_shard=100, text_width=16)
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert shards == 3 and [entry["samples"] for entry in manifest["latent_shards"]] == [84, 83, 83]
    assert manifest["text_embedding_shape"] == [77, 16] and manifest["bytes_per_sample"] == 2 * (4 * 8 * 8 + 77 * 16)
    data = load_latent_data(run)
    assert data.counts()["samples"] == 250 and data.counts()["incomplete_samples"] == 0
    assert data.spec.empty_caption_embedding.shape == (77, 16)
    assert data.shards[0].by_bucket[""].keys[:2] == ("00000000", "00000001")
    batch = data.batch([(0, 0), (2, 82)])
    assert tuple(batch["latents"].shape) == (2, 4, 8, 8) and tuple(batch["text_embeddings"].shape) == (2, 77, 16)
