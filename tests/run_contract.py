"""Shared by the end-to-end tests (local, S3, `ray job submit`): the small overrides of the tiny
preset, the CLI as a subprocess, and the run directory's contract checked through `RunDir`, so
the same checks read a local folder or a bucket."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pipeline.core import layout
from pipeline.core.rundir import RunDir

SMALL = [
    "ingest.toy_count=240",
    "ingest.samples_per_shard=60",
    "encode.batch_size=60",
    "train.max_steps=8",
    "train.checkpoint_every=4",
    "train.warmup_steps=2",
    "train.batch_size_per_worker=8",
    "train.log_every=2",
    "sample.steps=4",
    "sample.seeds=[0]",
    "ray.num_cpus=2",
]


def set_args(overrides: list[str]) -> list[str]:
    """`--set KEY=VALUE` for every override."""
    return [arg for item in overrides for arg in ("--set", item)]


def pipeline(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "pipeline"), *args]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def check_run_contract(url: str) -> None:
    """What a finished run of the tiny preset with SMALL leaves in its run directory."""
    run = RunDir(url)
    manifest = run.read_json(layout.RUN_MANIFEST)
    for name in layout.STAGES:
        entry = manifest["stages"][name]
        assert entry["status"] == "done", (name, entry)
        assert entry["seconds"] >= 0 and entry["started"] and entry["finished"] and entry["fingerprint"]
    config = run.read_text(layout.CONFIG)
    assert "train.max_steps" not in config and "max_steps = 8" in config

    stats = run.read_json(layout.INGEST_STATS)
    assert stats["succeeded"] == 240 and len(run.list(layout.INGEST_SHARDS, ".tar")) == 4

    encode_manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert encode_manifest["samples"] == 240 and "npy_base64" in encode_manifest["empty_caption_embedding"]
    encoded = 0
    for shard in run.list(layout.ENCODE_SHARDS, ".tar"):
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{shard}"))) as archive:
            encoded += sum(name.endswith(".latent.npy") for name in archive.getnames())
    assert encoded == 240
    # One latent shard per raw shard, same stem; the manifest counts each one's samples.
    assert run.list(layout.ENCODE_SHARDS, ".tar") == run.list(layout.INGEST_SHARDS, ".tar")
    assert sum(entry["samples"] for entry in encode_manifest["latent_shards"]) == 240
    assert len(run.list(layout.INGEST_URLS, ".parquet")) == 4 and run.exists(f"{layout.INGEST_URLS}/index.json")

    checkpoints = run.list(layout.TRAIN_CHECKPOINTS)
    assert {layout.step_name(4), layout.step_name(8)} <= set(checkpoints), checkpoints
    for step in (4, 8):
        export = f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}"
        assert run.exists(f"{export}/{layout.COMMIT_MARKER}")
        assert run.exists(f"{export}/{layout.EXPORT_UNET}/diffusion_pytorch_model.safetensors")
        # A whole diffusers pipeline: the run's encoders shared in (hard links, or copies on S3), its sampler, a card.
        pipeline_parts = (
            "vae/config.json",
            "text_encoder/config.json",
            "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json",
        )
        for part in (layout.EXPORT_MODEL_INDEX, layout.EXPORT_MODEL_CARD, *pipeline_parts):
            assert run.exists(f"{export}/{part}"), (export, part)
    assert any(name.startswith("events.out.tfevents") for name in run.list(layout.TRAIN_LOGS))
    rows = [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines()]
    assert rows and all(row["loss"] > 0 for row in rows)

    validation = run.read_json(layout.SAMPLE_VALIDATION)
    assert [entry["step"] for entry in validation["checkpoints"]] == [4, 8]
    for entry in validation["checkpoints"]:
        accuracy = entry["metrics"]["prompt_accuracy"]
        assert set(accuracy) == {"0", "1", "3", "7.5"} and all(0 <= a <= 1 for a in accuracy.values())
    html = run.read_text(layout.REPORT_INDEX)
    assert "<img" in html and "http://" not in html.split("<body", 1)[-1]
