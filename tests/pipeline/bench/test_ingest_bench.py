"""`pipeline bench ingest` runs both sides on the same data and ends with one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_bench_ingest_prints_ratio_json_last():
    command = [str(Path(sys.executable).parent / "pipeline"), "bench", "ingest", "--images", "120"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "ingest"
    assert report["succeeded"] == {"plain": 120, "img2dataset_ray": 120, "stage_1_worker": 120, "stage_2_workers": 120}
    assert report["ratio"] > 0 and report["img_per_s"] > 0 and report["scaling_2_vs_1"] > 0
    assert abs(report["ratio"] - report["img_per_s"] / report["plain_img_per_s"]) < 0.05 * report["ratio"]
