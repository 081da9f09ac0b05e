"""`pipeline bench train` runs the stage and the bare loop on the same batches, measures ZeRO-3's
memory per rank against ZeRO-0's, and ends with one JSON line; plus the helpers it counts with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench.train import held_bytes, steady_state
from train.step import PlainEngine

POSITIVE = (
    "ratio samples_per_s bare_samples_per_s wall_ratio stage_wall_samples_per_s stage_summary_samples_per_s "
    "stage_seconds stage_steady_seconds bare_seconds zero3_memory_ratio parameter_count "
    "cpu_mfu bare_cpu_mfu train_flops_per_sample matmul_flops_per_s"
)


@pytest.mark.e2e
def test_bench_train_prints_ratio_and_zero3_memory_json_last():
    command = [str(Path(sys.executable).parent / "pipeline"), "bench", "train", "--images", "256"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["bench"] == "train" and report["device"] == "cpu"
    assert report["batch_size"] == 32 and report["steps"] == 256 // 32 and report["threads"] == 1
    assert report["steady_steps"] == report["bare_steps"] == report["steps"] - report["log_every"] > 0
    assert all(report[key] > 0 for key in POSITIVE.split()), report
    assert len(report["bare_samples_per_s_halves"]) == 2 and min(report["bare_samples_per_s_halves"]) > 0
    assert report["ratio"] == pytest.approx(report["samples_per_s"] / report["bare_samples_per_s"], rel=0.01)
    wall_ratio = report["stage_wall_samples_per_s"] / report["bare_samples_per_s"]
    assert report["wall_ratio"] == pytest.approx(wall_ratio, rel=0.01, abs=5e-4)  # ratios are rounded to 3 decimals
    assert report["stage_seconds"] > report["stage_steady_seconds"]  # the wall clock holds start-up and the checkpoint too
    # How near the cores' limit: the steady rate's FLOP/s over a plain matmul's on the same thread, the faster half.
    assert (
        report["matmul_flops_per_s"] == max(report["matmul_flops_per_s_halves"]) and len(report["matmul_flops_per_s_halves"]) == 2
    )
    expected = report["samples_per_s"] * report["train_flops_per_sample"] / report["matmul_flops_per_s"]
    assert report["cpu_mfu"] == pytest.approx(expected, rel=0.01)
    from pipeline.core.config import load_config
    from pipeline.plan import UNET_TRAIN_FLOPS, quadratic_flops

    unet = load_config("tiny").train.unet  # the tiny preset's UNet, counted at 64 px
    assert report["train_flops_per_sample"] == quadratic_flops(UNET_TRAIN_FLOPS[unet], 64)

    zero0, zero3 = report["zero0_held_per_rank"], report["zero3_held_per_rank"]
    assert len(zero0) == len(zero3) == report["memory_workers"] == 2
    fp32_parameters = 4 * report["parameter_count"]
    for rank in zero0:  # every parameter whole, and Adam's two moments of each
        assert rank["parameters"] == rank["whole_parameters"] == fp32_parameters
        assert rank["optimizer_state"] >= 2 * fp32_parameters
    for rank in zero3:  # the moments of half the parameters; the parameters partly partitioned
        assert rank["optimizer_state"] < 0.55 * zero0[0]["optimizer_state"]
        assert rank["whole_parameters"] < rank["parameters"] < fp32_parameters
    assert report["zero0_bytes_per_rank"] == [rank["parameters"] + rank["optimizer_state"] for rank in zero0]
    assert report["zero3_bytes_per_rank"] == [rank["parameters"] + rank["optimizer_state"] for rank in zero3]
    ratio = max(report["zero3_bytes_per_rank"]) / max(report["zero0_bytes_per_rank"])
    assert report["zero3_memory_ratio"] == pytest.approx(ratio, abs=0.001) and ratio < 1


def test_steady_state_leaves_out_the_first_log_window():
    rows = [{"step": 10, "samples_per_s": 1.0}, {"step": 20, "samples_per_s": 64.0}, {"step": 30, "samples_per_s": 32.0}]
    steps, seconds = steady_state(rows, samples_per_step=32)
    assert steps == 20 and seconds == pytest.approx(320 / 64 + 320 / 32)


def test_held_bytes_counts_each_storage_once():
    module = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    engine = PlainEngine(module, torch.optim.AdamW(module.parameters()))
    assert held_bytes(engine) == {"parameters": 440, "whole_parameters": 440, "optimizer_state": 0}  # no state before a step
    engine.backward(module(torch.randn(2, 10)).sum())
    engine.step()
    held = held_bytes(engine)
    assert held["parameters"] == 440 and 2 * 440 <= held["optimizer_state"] <= 2 * 440 + 2 * 8  # two moments, step counts
