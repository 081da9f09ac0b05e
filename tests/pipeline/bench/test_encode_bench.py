"""`pipeline bench encode` runs the stage and the bare loop on the same images and ends with one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

POSITIVE = "ratio samples_per_s wall_ratio wall_samples_per_s steady_seconds bare_samples_per_s stage_seconds bare_seconds peak_rss_mb peak_rss_mb_half_shards memory_growth_2x"


@pytest.mark.e2e
def test_bench_encode_prints_ratio_json_last():
    command = [str(Path(sys.executable).parent / "pipeline"), "bench", "encode", "--images", "200"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "encode" and report["device"] == "cpu"
    assert report["samples"] == 200 and report["bare_samples"] == 200 and report["samples_half_shards"] == 100
    assert report["shards"] == 2 * report["shards_half"] >= 4
    assert report["batch_size"] > 0 and report["threads"] >= 1
    assert all(report[key] > 0 for key in POSITIVE.split()), report
    assert abs(report["ratio"] - report["samples_per_s"] / report["bare_samples_per_s"]) < 0.05 * report["ratio"]
    assert abs(report["wall_ratio"] - report["wall_samples_per_s"] / report["bare_samples_per_s"]) < 0.05 * report["wall_ratio"]
    assert report["steady_seconds"] < report["stage_seconds"]  # the stream, without the start-up
    growth = report["peak_rss_mb"] / report["peak_rss_mb_half_shards"]
    assert abs(report["memory_growth_2x"] - growth) < 0.01 * growth
