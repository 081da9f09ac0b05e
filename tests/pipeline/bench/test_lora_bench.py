"""`pipeline bench lora`: a LoRA and a full fine-tune of the same base on the same batches, as ratios; JSON last."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_bench_lora_prints_the_three_ratios_json_last():
    command = [str(Path(sys.executable).parent / "pipeline"), "bench", "lora", "--images", "128"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=500, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    full, lora = report["full"], report["lora"]
    assert report["bench"] == "lora" and report["steps_each"] == 4 and "block 4/4" in result.stderr
    for key, side_key in [("optimizer_bytes_ratio", "optimizer_bytes"), ("checkpoint_bytes_ratio", "checkpoint_bytes")]:
        assert report[key] == pytest.approx(lora[side_key] / full[side_key], abs=0.001)
    assert report["step_time_ratio"] == pytest.approx(lora["step_seconds"] / full["step_seconds"], abs=0.002)
    # The same base: LoRA trains ~1% of it, and the optimizer (ZeRO-2, one rank) holds an fp32 copy of what trains and
    # Adam's two fp32 moments of it: 12 bytes per trainable parameter, nothing of the frozen base.
    assert 0 < lora["trainable_parameters"] < 0.03 * full["trainable_parameters"]  # 2.2% on the micro UNet
    for side in (full, lora):
        assert 12 * side["trainable_parameters"] <= side["optimizer_bytes"] <= 12 * side["trainable_parameters"] + 4096
    # Bytes do not depend on the machine: the bounds hold wherever it runs (step time is only reported).
    assert report["optimizer_bytes_ratio"] <= 0.1 and report["checkpoint_bytes_ratio"] <= 0.1
