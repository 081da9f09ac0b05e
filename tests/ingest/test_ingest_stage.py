"""The ingest stage for real: toy images on a loopback HTTP server, downloaded by img2dataset."""

import io
import json
import tarfile
import urllib.request

import numpy as np
from PIL import Image

from ingest.stage import run_stage
from ingest.toy import parse_caption
from ingest.toy_server import serve_directory
from pipeline import layout
from pipeline.config import load_config
from pipeline.rundir import RunDir
from sample.judge import is_correct


def test_toy_server_binds_loopback_and_serves_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with serve_directory(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/a.txt", timeout=5).read() == b"hello"


def test_ingest_writes_webdataset_shards_and_stats(tmp_path):
    config = load_config("tiny", overrides=["ingest.toy_count=120", "ingest.samples_per_shard=50"])
    run = RunDir(tmp_path)
    summary = run_stage(config, run)

    stats = run.read_json(layout.INGEST_STATS)
    assert stats["attempted"] == 120 and stats["succeeded"] == 120 and stats["failed"]["download"] == 0
    assert summary["counts"]["shards"] == 3
    shards = run.list(layout.INGEST_SHARDS, suffix=".tar")
    assert shards == ["00000.tar", "00001.tar", "00002.tar"]

    samples = {}
    for shard in shards:
        with tarfile.open(tmp_path / layout.INGEST_SHARDS / shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    assert len(samples) == 120
    for key, members in list(samples.items())[:20]:
        assert {"jpg", "txt", "json"} <= set(members)
        caption = members["txt"].decode()
        image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
        assert image.shape == (64, 64, 3)
        assert is_correct(image, parse_caption(caption))  # JPEG round trip keeps the colours judgeable
        assert json.loads(members["json"])["caption"] == caption
