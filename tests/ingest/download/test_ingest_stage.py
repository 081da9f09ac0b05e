"""The ingest stage for real: toy images on a loopback HTTP server, downloaded by img2dataset."""

import io
import json
import tarfile
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ingest.download import url_list
from ingest.download.stage import TOY_BASE_URL, refuse_foreign_shards, run_stage
from ingest.download.toy_server import serve_directory
from pipeline.core import layout
from pipeline.core.config import IngestConfig, load_config
from pipeline.core.errors import StageFailure
from pipeline.core.rundir import RunDir
from pipeline.core.toy import parse_caption
from sample.judge import is_correct


def test_toy_server_binds_loopback_and_serves_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with serve_directory(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/a.txt", timeout=5).read() == b"hello"


def test_ingest_writes_webdataset_shards_and_stats(tmp_path, ray_local):
    config = load_config("tiny", overrides=["ingest.toy_count=120", "ingest.samples_per_shard=50"])
    run = RunDir(tmp_path)
    summary = run_stage(config, run)

    stats = run.read_json(layout.INGEST_STATS)
    assert stats["attempted"] == 120 and stats["succeeded"] == 120 and sum(stats["failed"].values()) == 0
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
    for members in list(samples.values())[:20]:
        assert {"jpg", "txt", "json"} <= set(members)
        caption = members["txt"].decode()
        image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
        assert image.shape == (64, 64, 3)
        assert is_correct(image, parse_caption(caption))  # JPEG round trip keeps the colours judgeable
        assert json.loads(members["json"])["caption"] == caption


def test_rerun_redoes_only_missing_or_partial_shards(tmp_path, ray_local):
    from pipeline.core.rundir import complete_shards

    config = load_config("tiny", overrides=["ingest.toy_count=90", "ingest.samples_per_shard=30"])
    run = RunDir(tmp_path)
    run_stage(config, run)
    shards = tmp_path / layout.INGEST_SHARDS
    untouched = (shards / "00000.tar").stat().st_mtime_ns
    # the cleaned list names the toy host by a placeholder: it stays valid on the next run's port
    index = run.read_json(url_list.INDEX)
    first_parquet = pq.read_table(tmp_path / index["shards"][0][0])
    assert all(url.startswith(TOY_BASE_URL + "/") for url in first_parquet.column("url").to_pylist())
    cleaned_at = (tmp_path / url_list.INDEX).stat().st_mtime_ns
    # a download killed mid-shard: a truncated tar and no stats file yet
    (shards / "00001_stats.json").unlink()
    (shards / "00001.tar").write_bytes((shards / "00001.tar").read_bytes()[:5000])
    # a shard never started
    for name in ("00002.tar", "00002.parquet", "00002_stats.json"):
        (shards / name).unlink()
    assert complete_shards(run) == ["00000.tar"]  # later stages never read the partial one

    run_stage(config, run)
    stats = run.read_json(layout.INGEST_STATS)
    assert stats["resumed_shards"] == 1 and stats["succeeded"] == 90 and stats["shards"] == 3
    assert (shards / "00000.tar").stat().st_mtime_ns == untouched
    assert (tmp_path / url_list.INDEX).stat().st_mtime_ns == cleaned_at  # not cleaned again
    assert stats["attempted"] + sum(stats["prefiltered"].values()) == index["rows"]
    assert complete_shards(run) == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards / "00001.tar") as archive:
        assert sum(name.endswith(".jpg") for name in archive.getnames()) == 30


def test_shards_from_another_split_of_the_list_are_refused_not_mixed(tmp_path):
    run = RunDir(tmp_path)
    settings = IngestConfig(source="urls", url_list=str(tmp_path / "urls.parquet"))
    refuse_foreign_shards(settings, run)  # nothing downloaded yet: fine
    run.write_json(f"{layout.INGEST_SHARDS}/00000{layout.SHARD_STATS_SUFFIX}", {"count": 1})
    with pytest.raises(StageFailure, match="an older version .* rerun the stage with --force"):  # one line, no traceback
        refuse_foreign_shards(settings, run)  # shards but no index: cut by an older version
    run.write_json(url_list.INDEX, {"fingerprint": "other"})
    with pytest.raises(StageFailure, match="other ingest settings"):
        refuse_foreign_shards(settings, run)
    run.write_json(url_list.INDEX, {"fingerprint": url_list.fingerprint(settings)})
    refuse_foreign_shards(settings, run)  # this cleaning's shards: resumed
