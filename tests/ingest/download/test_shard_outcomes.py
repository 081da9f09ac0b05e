"""Per-shard outcome records, their aggregation, and the download driver's pieces that need no network."""

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_accounting
from test_accounting import write_shard

from ingest.download import accounting, distribute
from ingest.download.url_list import CleanList
from pipeline.core import layout
from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir, complete_shard_ids, complete_shards

OK = ("success", None)
NOT_FOUND = ("failed_to_download", "HTTP Error 404: Not Found")
TIMEOUT = ("failed_to_download", "timed out")


def test_outcome_is_recorded_and_read_back_instead_of_the_parquet(tmp_path):
    run = RunDir(tmp_path / "run")
    size = write_shard(run, 0, [OK, OK, NOT_FOUND])
    outcome = accounting.record_outcome(run, "00000")
    assert outcome == {"shard": 0, "attempted": 3, "succeeded": 2, "failed": {"http_error": 1}, "bytes": size}
    assert run.read_json(accounting.outcome_path("00000")) == outcome
    # the driver reads the record only: a parquet damaged afterwards changes nothing
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.parquet", b"PAR1 truncated")
    assert accounting.read_outcomes(run) == {0: outcome}


def test_read_outcomes_computes_and_records_the_missing_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK, TIMEOUT])
    write_shard(run, 1, [OK])
    write_shard(run, 2, [OK], stats=False)  # killed: no outcome, not counted
    accounting.record_outcome(run, "00000")
    run.write_text(accounting.outcome_path("00001"), "{not json")  # unreadable: computed again
    listing = accounting.list_shards(run)
    assert (listing.complete, listing.incomplete, listing.recorded) == ({0: "00000", 1: "00001"}, ["00002"], {0, 1})
    outcomes = accounting.read_outcomes(run, listing)
    assert sorted(outcomes) == [0, 1] and outcomes[1]["succeeded"] == 1
    assert run.read_json(accounting.outcome_path("00001")) == outcomes[1]
    assert accounting.read_outcomes(run, shard_ids=[1]) == {1: outcomes[1]}


def test_a_stale_record_without_stats_is_not_counted(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [OK])
    accounting.record_outcome(run, "00000")
    run.remove(f"{layout.INGEST_SHARDS}/00000{layout.SHARD_STATS_SUFFIX}")  # a rerun started over
    assert accounting.run_stats(run)["shards"] == 0
    assert accounting.run_stats(run)["incomplete_shards"] == ["00000"]


def test_aggregate_adds_outcomes_up():
    outcomes = [
        {"shard": 0, "attempted": 5, "succeeded": 3, "failed": {"timeout": 1, "http_error": 1}, "bytes": 100},
        {"shard": 1, "attempted": 4, "succeeded": 4, "failed": {}, "bytes": 80},
        {"shard": 2, "attempted": 2, "succeeded": 0, "failed": {"other": 1, "http_error": 1}, "bytes": 10},
    ]
    prefilter = {"rows": 15, "kept": 11, "dropped": {"malformed_url": 4, "duplicate_url": 0}, "nulled": {}}
    stats = accounting.aggregate(outcomes, prefilter, ["00007"])
    assert stats == {
        "attempted": 11,
        "succeeded": 7,
        "failed": {"http_error": 2, "timeout": 1, "other": 1},
        "prefiltered": {"malformed_url": 4},
        "shards": 3,
        "incomplete_shards": ["00007"],
        "bytes": 190,
    }
    assert list(stats["failed"]) == [reason for reason in accounting.REASONS if reason in stats["failed"]]
    assert stats["attempted"] + sum(stats["prefiltered"].values()) == prefilter["rows"]
    assert accounting.aggregate([], None)["shards"] == 0


def test_wider_shard_names_parse_everywhere(tmp_path):
    """Over 99,999 shards img2dataset's names get a sixth digit (oom_shard_count = shard_width)."""
    assert accounting.shard_width(3) == 5 and accounting.shard_width(100_000) == 6
    assert accounting.shard_name(42, 6) == "000042"
    run = RunDir(tmp_path / "run")
    for shard in (0, 1):
        write_shard(run, shard, [OK])
        for suffix in (".tar", ".parquet", layout.SHARD_STATS_SUFFIX):
            src = f"{layout.INGEST_SHARDS}/{shard:05d}{suffix}"
            run.write_bytes(f"{layout.INGEST_SHARDS}/{shard:06d}{suffix}", run.read_bytes(src))
            run.remove(src)
    run.remove(f"{layout.INGEST_SHARDS}/000001{layout.SHARD_STATS_SUFFIX}")
    accounting.record_outcome(run, "000000")  # the download task's check, then the completion marker
    assert complete_shard_ids(run) == {0} and complete_shards(run) == ["000000.tar"]
    assert accounting.list_shards(run).incomplete == ["000001"]
    assert accounting.run_stats(run)["succeeded"] == 1


def test_url_rewrite_replaces_only_the_prefix():
    table = pa.table({"url": ["http://toy.invalid/a.png", "http://other/http://toy.invalid/b", None], "caption": ["a", "b", "c"]})
    out = distribute.rewrite_prefix(table, ("http://toy.invalid", "http://127.0.0.1:5000"))
    assert out.column("url").to_pylist() == ["http://127.0.0.1:5000/a.png", "http://other/http://toy.invalid/b", None]
    assert out.column_names == ["url", "caption"]
    assert distribute.rewrite_prefix(table, None) is table


def _clean_list(run: RunDir, sizes: list[int]) -> CleanList:
    shards = []
    for shard, rows in enumerate(sizes):
        buffer = io.BytesIO()
        table = pa.table({"url": [f"http://toy.invalid/{shard}-{i}" for i in range(rows)], "caption": ["c"] * rows})
        pq.write_table(table, buffer)
        path = f"{layout.INGEST_URLS}/{shard:05d}.parquet"
        run.write_bytes(path, buffer.getvalue())
        shards.append((path, rows))
    return CleanList(rows=sum(sizes) + 2, kept=sum(sizes), dropped={"malformed_url": 2}, nulled={}, shards=shards)


def test_download_resumes_from_outcome_records_and_unrecorded_shards(tmp_path, ray_local, monkeypatch, caplog):
    """Shards complete before (one with a record, one without) are not downloaded again; the rest are,
    each from its own parquet with the URL prefix rewritten."""
    run = RunDir(tmp_path / "run")
    clean = _clean_list(run, [2, 2, 3, 1])
    write_shard(run, 0, [OK, NOT_FOUND])
    accounting.record_outcome(run, "00000")
    write_shard(run, 1, [OK, OK])  # complete, from a version that wrote no record
    write_shard(run, 2, [OK], stats=False)  # killed mid-way: downloaded again

    class FakeDownloader:
        """Writes what img2dataset would: each URL of the shard's Arrow file 'succeeds'."""

        column_list = ["caption", "url"]

        def __call__(self, row):
            shard_id, arrow_file = row
            urls = pa.ipc.open_file(arrow_file).read_all().column("url").to_pylist()
            assert all(url.startswith("http://live:1/") for url in urls), urls
            write_shard(RunDir(tmp_path / "run"), shard_id, [OK] * len(urls))
            return True, row

    # Ray's workers cannot import the test modules: send the fake (and write_shard) by value
    ray_local.cloudpickle.register_pickle_by_value(test_accounting)
    monkeypatch.setattr(distribute, "_downloader", lambda *args: FakeDownloader())
    with caplog.at_level(logging.INFO, logger="pipeline.ingest"):
        downloaded = distribute.download(IngestConfig(cpus_per_task=0.5), clean, run, ("http://toy.invalid", "http://live:1"))
    lines = [record.getMessage() for record in caplog.records]
    assert "4 shard(s): 2 already complete, 2 to download" in lines
    assert any(line.startswith("4/4 shards, 4 images") for line in lines), lines  # the progress summary
    assert downloaded.resumed_shards == 2 and downloaded.incomplete == []
    assert sorted(downloaded.outcomes) == [0, 1, 2, 3]
    stats = accounting.aggregate(downloaded.outcomes.values(), clean.prefilter(), downloaded.incomplete)
    assert (stats["attempted"], stats["succeeded"], stats["failed"], stats["shards"]) == (8, 7, {"http_error": 1}, 4)
    assert stats["attempted"] + sum(stats["prefiltered"].values()) == clean.rows
    assert accounting.list_shards(run).recorded == {0, 1, 2, 3}
    assert stats == accounting.run_stats(run, clean.prefilter())


def test_in_flight_limit_follows_free_cpus(ray_local):
    free = int(ray_local.available_resources().get("CPU", 0))
    assert distribute.in_flight_limit(1.0) == max(1, 2 * free)
    assert distribute.in_flight_limit(1000.0) == 1


def test_missing_task_raises_through_the_driver(tmp_path, ray_local, monkeypatch):
    run = RunDir(tmp_path / "run")
    clean = _clean_list(run, [1])

    class Failing:
        column_list = ["caption", "url"]

        def __call__(self, row):
            return False, row

    monkeypatch.setattr(distribute, "_downloader", lambda *args: Failing())
    with pytest.raises(Exception, match="shard 00000 failed"):
        distribute.download(IngestConfig(shard_retries=0, cpus_per_task=0.5), clean, run)
