"""`pipeline bench scale-ingest` at a tiny size: every key of its JSON is there, the counts the cleaning
reports are exactly those the synthetic list was made with, and the numbers are positive and finite
(what they should be is the bench's to report, not a test's to assert)."""

import json
import math

import pyarrow.parquet as pq
import pytest

from pipeline.bench.scale_ingest import SCALE, run_bench, write_synthetic_list
from pipeline.cli import BENCHES

NUMBERS = (
    "clean_rss_ratio_4x clean_vs_pyarrow rss_mb_1x rss_mb_4x clean_seconds_1x clean_seconds_4x "
    "clean_rows_per_s pyarrow_rows_per_s cpu_count"
)


@pytest.mark.e2e  # ~25 s: with the other benches' tests, out of `make test`'s 8 minutes
def test_scale_ingest_reports_every_key_and_exact_counts():
    report = run_bench(images=20_000, repeats=1, samples_per_shard=1000, shards_4x=400, encode=False)
    json.dumps(report)  # what the CLI prints
    assert report["bench"] == "scale-ingest" and BENCHES["scale-ingest"] == "pipeline.bench.scale_ingest:run_bench"
    for key in NUMBERS.split():
        assert isinstance(report[key], int | float) and math.isfinite(report[key]) and report[key] > 0, (key, report[key])
    assert report["counts_exact"] is True
    assert report["expected_1x"] == {"rows": 20_000, "kept": 19_400, "dropped": {"malformed_url": 200, "duplicate_url": 400}}
    assert report["prefilter_1x"] == {**report["expected_1x"], "nulled": {}}
    assert report["prefilter_4x"]["kept"] == SCALE * 19_400 and report["rows_4x"] == SCALE * 20_000
    assert report["shards_1x"] == 20 and report["shards_4x"] == math.ceil(SCALE * 19_400 / 1000)  # one partition each
    assert set(report["passed"]) == set(report["targets"]) == {"clean_rss_ratio_4x", "clean_vs_pyarrow", "bookkeeping_ratio_4x"}
    assert report["bookkeeping_shards_4x"] == 400 and report["bookkeeping_ratio_4x"] > 0
    assert set(report["bookkeeping_seconds"]["4x"]) == {"scheduling", "accounting", "encode_planning"}
    assert report["clean_dominant_step"] in report["clean_split_seconds"]
    assert min(report["clean_split_seconds"].values()) >= -0.01


def test_synthetic_list_is_laion_like(tmp_path):
    synthetic = write_synthetic_list(tmp_path / "urls.parquet", 1000, seed=3)
    table = pq.read_table(synthetic["path"])
    assert table.column_names == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe"]
    urls = table.column("URL").to_pylist()
    assert len(set(urls)) < len(urls) and None in urls or "http://" in urls
    assert synthetic["expected"]["kept"] == 1000 - 10 - 20
