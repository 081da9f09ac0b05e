"""The tiny pipeline through the CLI with its run directory on S3 (the moto server of `s3_server`;
the endpoint and credentials come from the environment conftest sets), then the run's contract
read back from the bucket; then raising train.max_steps continues that run in the bucket."""

import json

import boto3
import pytest
from run_contract import SMALL, check_run_contract, pipeline, set_args

from pipeline.core import layout
from pipeline.core.rundir import RunDir

# An end-to-end run of `make test-e2e`, not of `make test` (which runs tests/e2e/test_end_to_end.py only).
pytestmark = pytest.mark.e2e

BUCKET = "e2e-runs"


def test_tiny_run_on_s3(s3_server, tmp_path):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/run"
    result = pipeline("run", "--preset", "tiny", "--out", url, *set_args(SMALL), timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    check_run_contract(url)
    keys = [
        item["Key"]
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]
    assert not [key for key in keys if "/_tmp/" in key or ".tmp-" in key or "/.tmp" in key]

    from diffusers import StableDiffusionPipeline

    # The export, copied out of the bucket, is a whole pipeline: its encoders were copied in server-side.
    local = RunDir(url).get_dir(f"{layout.TRAIN_EXPORT}/{layout.step_name(8)}", tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(local)
    assert sum(parameter.numel() for parameter in pipe.unet.parameters()) > 0 and pipe.vae and pipe.text_encoder

    raising_max_steps_continues_training_and_validates_only_new_exports(url)


def raising_max_steps_continues_training_and_validates_only_new_exports(url: str) -> None:
    run = RunDir(url)
    before = run.manifest()
    overrides = [item for item in SMALL if not item.startswith("train.max_steps")] + ["train.max_steps=12"]
    result = pipeline("run", "--preset", "tiny", "--out", url, *set_args(overrides), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    after = run.manifest()
    for name in ("ingest", "encode"):
        assert after["stages"][name]["finished"] == before["stages"][name]["finished"]
    assert after["stages"]["train"]["steps"] == 12
    rows = [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines()]
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})  # no step trained twice
    assert run.exists(f"{layout.TRAIN_EXPORT}/{layout.step_name(4)}/{layout.COMMIT_MARKER}")
    validation = run.read_json(layout.SAMPLE_VALIDATION)
    assert [entry["step"] for entry in validation["checkpoints"]] == [4, 8, 12]
    sample = after["stages"]["sample"]
    # The new export is validated once: by the watcher beside training (sample.watch) or by the stage after it.
    assert sample["counts"]["newly_validated"] + len(sample.get("watch", {}).get("validated", [])) == 1
