"""`pipeline bench gpu --tiny` end to end on this machine (the CPU where there is no GPU): every key
of its JSON is there and its numbers positive and finite (what they should be is the bench's to
report, not a test's to assert); plus the FLOP count and the peak table it divides by."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from pipeline import cli as pipeline_cli
from pipeline.bench.gpu import (
    FULL,
    TINY,
    _count_flops,
    _train_unet,
    _write_latents,
    device_peak,
    run_bench,
    train_config,
    unet_flops_per_image,
)
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir
from train.data import read_spec
from train.unet import build_unet

POSITIVE = {
    "unet": "images_per_s mfu peak_memory_gb flops_per_image batch seconds parameters",
    "vae": "images_per_s mfu peak_memory_gb flops_per_image resolution batch seconds",
    "": "peak_tflops_bf16 anchor_images_per_s_a100 ratio_to_anchor anchor_mfu_a100 seconds",
}


@pytest.mark.e2e  # half a minute: a DeepSpeed engine and a VAE in fresh processes
def test_bench_gpu_tiny_prints_every_key_positive_and_finite_json_last():
    command = [str(Path(sys.executable).parent / "pipeline"), "bench", "gpu", "--tiny"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["bench"] == "gpu" and report["mode"] == "tiny" and report["device"]
    for part, keys in POSITIVE.items():
        values = report[part] if part else report
        for key in keys.split():
            value = values[key]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (part, key, value)
    unet, vae = report["unet"], report["vae"]
    assert unet["precision"] == "bf16" and unet["zero_stage"] == 2 and unet["batch"] == TINY.batch
    assert unet["latent_shape"] == [4, 8, 8] and unet["steps"] == TINY.steps and unet["batches_out_of_memory"] == []
    assert vae["resolution"] == 64 and vae["precision"] in ("bf16", "fp32")
    assert report["anchor_images_per_s_a100"] == 137
    assert report["ratio_to_anchor"] == pytest.approx(unet["images_per_s"] / 137, abs=1e-3)


def test_the_full_shape_trains_sd15_on_4x32x32_latents_and_768_wide_text(tmp_path):
    """What the GPU run trains on, written here at a few samples: SD-1.5's latent and text shapes."""
    run = RunDir(tmp_path / "run")
    assert _write_latents(run, replace(FULL, warmup_steps=1, steps=2, batch=2), tmp_path) == 2
    spec = read_spec(run)
    assert spec.latent_shape == (4, 32, 32) and spec.text_embedding_shape == (77, 768)
    assert run.read_json(layout.ENCODE_MANIFEST)["samples"] == 6

    train = train_config(FULL, 64).train
    assert (train.unet, train.zero_stage, train.precision, train.batch_size_per_worker) == ("sd15", 2, "bf16", 64)
    assert train.num_workers == 1 and train.max_steps == FULL.warmup_steps + FULL.steps


def test_the_unet_batch_is_halved_while_it_runs_out_of_memory(monkeypatch):
    batches = []

    def fake_worker(request, distributed=False):
        batches.append(request["batch"])
        return {"out_of_memory": True} if request["batch"] > 16 else {"images_per_s": 1.0, "batch": request["batch"]}

    monkeypatch.setattr("pipeline.bench.gpu.run_worker", fake_worker)
    report = _train_unet(RunDir("/nowhere"), FULL)
    assert batches == [64, 32, 16] and report["batch"] == 16 and report["batches_out_of_memory"] == [64, 32]

    monkeypatch.setattr("pipeline.bench.gpu.run_worker", lambda request, distributed=False: {"out_of_memory": True})
    with pytest.raises(RuntimeError, match="every batch from 64 down to 8"):
        _train_unet(RunDir("/nowhere"), FULL)


def test_flops_counted_on_the_meta_device_match_a_real_count_with_attention():
    """The meta device's attention decomposes into counted matrix products; on a CPU, torch's
    fused attention is not in the counter's table, so the real count forces the math kernel."""
    batch = 2
    torch.manual_seed(0)
    unet = build_unet(load_config(TINY.preset).train.unet, TINY.text_width, TINY.resolution // 8)
    latents = torch.randn(batch, 4, 8, 8)
    text = torch.randn(batch, 77, TINY.text_width)

    def step() -> None:
        unet(latents, torch.zeros(batch, dtype=torch.long), encoder_hidden_states=text).sample.pow(2).mean().backward()

    with sdpa_kernel(SDPBackend.MATH):
        real = _count_flops(step)
    assert unet_flops_per_image(TINY, batch) == real // batch


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA A10G", 125),
    ],
)
def test_device_peak_reads_the_table_by_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = device_peak(torch.device("cuda", 0))
    assert peak["device"] == name and peak["flops"] == tflops * 1e12 and peak["source"].startswith("table")


def test_device_peak_measures_a_device_not_in_the_table():
    peak = device_peak(torch.device("cpu"))
    assert peak["device"] == "cpu" and peak["flops"] > 0 and peak["source"].startswith("measured")


def test_the_full_bench_refuses_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too
    with pytest.raises(ValueError, match="--tiny"):
        run_bench()


def test_tiny_is_only_for_the_gpu_bench():
    result = CliRunner().invoke(pipeline_cli.app, ["bench", "train", "--tiny"])
    assert result.exit_code == 2 and "bench train takes no --tiny" in result.output
