"""Every stage through the real components: the `pipeline` CLI, a loopback HTTP server,
img2dataset, Ray Data, Ray Train + DeepSpeed ZeRO-2 with 2 workers, guided sampling and the
report; then the run directory's contract, and a rerun that skips everything."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import layout

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


def pipeline(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "pipeline"), *args]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_bad_config_fails_before_any_work(tmp_path):
    result = pipeline("run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "train.zero_stage=5")
    assert result.returncode == 2
    assert "train.zero_stage" in result.stderr
    assert not (tmp_path / "run").exists()


def test_config_show_prints_every_section():
    result = pipeline("config", "show", "--preset", "sd15-256")
    assert result.returncode == 0, result.stderr
    for section in ("[ingest]", "[encode]", "[train]", "[sample]"):
        assert section in result.stdout
    assert 'text_encoder = "openai/clip-vit-large-patch14"' in result.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    result = pipeline("run", "--preset", "tiny", "--out", str(out), *[arg for item in SMALL for arg in ("--set", item)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_run_directory_contract(tiny_run):
    out = tiny_run
    manifest = json.loads((out / layout.RUN_MANIFEST).read_text())
    for name in layout.STAGES:
        entry = manifest["stages"][name]
        assert entry["status"] == "done", (name, entry)
        assert entry["seconds"] >= 0 and entry["started"] and entry["finished"] and entry["fingerprint"]
    assert "train.max_steps" not in (out / layout.CONFIG).read_text()
    assert "max_steps = 8" in (out / layout.CONFIG).read_text()

    stats = json.loads((out / layout.INGEST_STATS).read_text())
    assert stats["succeeded"] == 240 and len(list((out / layout.INGEST_SHARDS).glob("*.tar"))) == 4

    encode_manifest = json.loads((out / layout.ENCODE_MANIFEST).read_text())
    assert encode_manifest["samples"] == 240 and "npy_base64" in encode_manifest["empty_caption_embedding"]
    encoded = 0
    for shard in (out / layout.ENCODE_SHARDS).glob("*.tar"):
        with tarfile.open(shard) as archive:
            encoded += sum(name.endswith(".latent.npy") for name in archive.getnames())
    assert encoded == 240

    checkpoints = out / layout.TRAIN_CHECKPOINTS
    assert (checkpoints / layout.step_name(4)).is_dir() and (checkpoints / layout.step_name(8)).is_dir()
    for step in (4, 8):
        export = out / layout.TRAIN_EXPORT / layout.step_name(step)
        assert (export / layout.COMMIT_MARKER).exists()
        assert (export / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert any((out / layout.TRAIN_LOGS).rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (out / layout.TRAIN_METRICS).read_text().splitlines()]
    assert rows and all(row["loss"] > 0 for row in rows)

    validation = json.loads((out / layout.SAMPLE_VALIDATION).read_text())
    assert [entry["step"] for entry in validation["checkpoints"]] == [4, 8]
    for entry in validation["checkpoints"]:
        accuracy = entry["metrics"]["prompt_accuracy"]
        assert set(accuracy) == {"0", "1", "3", "7.5"} and all(0 <= a <= 1 for a in accuracy.values())
    html = (out / layout.REPORT_INDEX).read_text()
    assert "<img" in html and "http://" not in html.split("<body", 1)[-1]


def test_rerun_of_a_finished_run_skips_every_stage(tiny_run):
    before = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    result = pipeline("run", "--out", str(tiny_run), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    for name in layout.STAGES:
        assert after["stages"][name]["finished"] == before["stages"][name]["finished"]
        assert f"skip {name}:" in result.stderr


def test_half_finished_run_resumes_at_the_first_incomplete_stage(tiny_run):
    """Mark `sample` as interrupted and drop the report: a rerun redoes exactly those two,
    and validation, being incremental, samples no checkpoint twice."""
    manifest_path = tiny_run / layout.RUN_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["sample"]["status"] = "running"
    del manifest["stages"]["report"]
    manifest_path.write_text(json.dumps(manifest))
    (tiny_run / layout.REPORT_INDEX).unlink()

    result = pipeline("run", "--out", str(tiny_run), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads(manifest_path.read_text())
    for name in ("ingest", "encode", "train"):
        assert after["stages"][name]["finished"] == manifest["stages"][name]["finished"]
    assert after["stages"]["sample"]["status"] == after["stages"]["report"]["status"] == "done"
    assert after["stages"]["sample"]["counts"]["newly_validated"] == 0
    assert (tiny_run / layout.REPORT_INDEX).exists()


def test_raising_max_steps_continues_training_and_validates_only_new_exports(tiny_run):
    before = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    overrides = [item for item in SMALL if not item.startswith("train.max_steps")] + ["train.max_steps=12"]
    result = pipeline("run", "--preset", "tiny", "--out", str(tiny_run), *[a for item in overrides for a in ("--set", item)])
    assert result.returncode == 0, result.stderr[-4000:]
    after = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    for name in ("ingest", "encode"):
        assert after["stages"][name]["finished"] == before["stages"][name]["finished"]
    assert after["stages"]["train"]["steps"] == 12
    rows = [json.loads(line) for line in (tiny_run / layout.TRAIN_METRICS).read_text().splitlines()]
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})  # no step trained twice
    assert (tiny_run / layout.TRAIN_EXPORT / layout.step_name(4) / layout.COMMIT_MARKER).exists()
    validation = json.loads((tiny_run / layout.SAMPLE_VALIDATION).read_text())
    assert [entry["step"] for entry in validation["checkpoints"]] == [4, 8, 12]
    assert after["stages"]["sample"]["counts"]["newly_validated"] == 1
