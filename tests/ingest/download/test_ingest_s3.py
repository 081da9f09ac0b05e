"""Ingest writing its shards, stats and the run manifest to S3 (a local moto server)."""

import io
import tarfile

import boto3

from ingest.download.stage import run_stage
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir, complete_shards


def test_ingest_to_s3(s3_server, ray_local):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="runs")
    config = load_config("tiny", overrides=["ingest.toy_count=60", "ingest.samples_per_shard=30"])
    run = RunDir("s3://runs/ingest-test")
    assert run.url == "s3://runs/ingest-test"
    run_stage(config, run)

    assert run.read_json(layout.INGEST_STATS)["succeeded"] == 60
    assert complete_shards(run) == ["00000.tar", "00001.tar"]
    body = s3.get_object(Bucket="runs", Key=f"ingest-test/{layout.INGEST_SHARDS}/00001.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert sum(name.endswith(".jpg") for name in archive.getnames()) == 30
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="runs", Prefix="ingest-test/")["Contents"]]
    assert not any("/_tmp/" in key for key in keys)
