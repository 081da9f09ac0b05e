"""The URL-list cleaning at scale: the vectorised checks give the per-row cleaners' results, several
files and partitions keep each URL's first usable row, a resume cleans nothing again, S3 runs."""

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.download import url_list as ul
from ingest.download import url_rules, url_sources
from ingest.download.url_list import prepare_url_list
from ingest.download.url_rules import clean_batch, clean_caption, clean_url
from pipeline.core import layout
from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir


@pytest.fixture(autouse=True)
def through_ray_tasks(monkeypatch):
    """These lists are small: without this, the driver would clean them itself (INLINE_ROWS)."""
    monkeypatch.setattr(ul, "INLINE_ROWS", 0)


URL_PIECES = [
    "http://a.example/x.jpg",
    "https://A.Example/p?q=1#f",
    "HTTP://B.EXAMPLE/X",
    "HtTpS://c.example",
    "http://a.example:8080/x",
    "http://a.example:/x",
    "http://a.example:99999/x",
    "http://a.example:x/",
    "http://user:pw@a.example/x",
    "http://@a.example/",
    "http://[::1]/x",
    "http://[::1/x",
    "http://a]/x",
    "http://",
    "https:///x",
    "http:/a.example",
    "ftp://a.example/x",
    "javascript:alert(1)",
    "a.example/x",
    "http://a.example/caf\u00e9.jpg",
    "http://caf\u00e9.example/",
    "http://a.example/\u200bx",
    "http://a.example/a b",
    "http://a.example/\tx",
    "http://a.example/\x00",
    "http://a.example/\x7f",
    "http://a\\b.example/",
    "http://a.example/%20x",
    "http://a.example/" + "y" * 2030,
    "http://a.example/" + "y" * 2031,
    "http://a.example/?x=[1]",
    "http://a.example#[",
    "http://a.example/\x1c",
    "http://ex%41mple.com/",
    "",
    " ",
    "http://a.example/\udcff",
]
PADDING = ["", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", "\u2028"]
CAPTIONS = [
    "a cat",
    "",
    " ",
    "x",
    "xy",
    "ab" * 10,
    "a" * 21,
    "caf\u00e9",
    "\u00e9",
    "\u3000x\u3000",
    "x\x85",
    "\x1dx\x1e",
    "a\x00b",
    "\udcff",
    "snow \u2603",
    None,
]


def random_rows(count: int, seed: int, utf8_only: bool) -> tuple[list, list]:
    """Random rows from the pieces above; `utf8_only`: no lone surrogate (bytes that are not UTF-8),
    which sends the whole batch's non-ASCII values to the per-row cleaners."""
    draw = random.Random(seed)
    url_pieces = [url for url in URL_PIECES if not utf8_only or "\udcff" not in url]
    caption_pieces = [text for text in CAPTIONS if not utf8_only or text is None or "\udcff" not in text]
    urls, captions = [], []
    for _ in range(count):
        url = draw.choice(url_pieces)
        url = draw.choice(PADDING) + url + draw.choice(PADDING)
        urls.append(None if draw.random() < 0.03 else url)
        caption = draw.choice(caption_pieces)
        if caption is not None:
            caption = draw.choice(PADDING) + caption + draw.choice(PADDING)
        captions.append(caption)
    return urls, captions


def per_row(urls: list, captions: list, low: int, high: int) -> tuple[list, list, list, Counter]:
    """The cleaning as it was, one row at a time: kept indexes, their URLs and captions, the reasons."""
    kept, out_urls, out_captions, dropped = [], [], [], Counter()
    for i, (value, caption) in enumerate(zip(urls, captions)):
        url = clean_url(value)
        if url is None:
            dropped["malformed_url"] += 1
            continue
        text, why = clean_caption(caption, low, high)
        if why is not None:
            dropped[why] += 1
            continue
        kept.append(i), out_urls.append(url), out_captions.append(text)
    return kept, out_urls, out_captions, dropped


def encoded(values: list) -> list:
    """As bytes, the way a parquet binary column holds them (lone surrogates as the raw bytes they stood for)."""
    return [None if v is None else v.encode("utf-8", "surrogateescape") for v in values]


def column_forms(urls: list, captions: list):
    """(name, url column, caption column): parquet binary, string, large and dictionary columns, and lists."""
    raw_urls, raw_captions = encoded(urls), encoded(captions)
    yield "list", urls, captions  # CSV/JSONL: lone surrogates for bad bytes, the batch falls back to the cleaners
    yield "binary", pa.array(raw_urls, pa.binary()), pa.array(raw_captions, pa.binary())
    yield "large_binary", pa.array(raw_urls, pa.large_binary()), pa.array(raw_captions, pa.large_binary())
    # a string column holding invalid UTF-8, as another tool may write it
    yield "string", pa.array(raw_urls, pa.binary()).view(pa.string()), pa.array(raw_captions, pa.binary()).view(pa.string())
    yield (
        "large_string",
        pa.array(raw_urls, pa.large_binary()).view(pa.large_string()),
        pa.array(raw_captions, pa.large_binary()).view(pa.large_string()),
    )
    yield (
        "dictionary",
        pa.array(raw_urls, pa.binary()).dictionary_encode(),
        pa.array(raw_captions, pa.binary()).dictionary_encode(),
    )


@pytest.mark.parametrize("utf8_only", [True, False])
@pytest.mark.parametrize("low, high", [(1, 20), (0, 2000), (3, 5)])
def test_vectorised_checks_match_the_per_row_cleaners(low, high, utf8_only):
    urls, captions = random_rows(5000, seed=low * 100 + high, utf8_only=utf8_only)
    urls += [1, 2.5, float("nan"), b"http://a.example/bytes", b"http://a.example/\xff"]  # JSONL numbers, raw bytes
    captions += [3, float("nan"), True, b"caf\xc3\xa9", b"\xff"]
    settings = IngestConfig(
        source="urls", url_list="x.parquet", url_column="u", caption_column="c", min_caption_chars=low, max_caption_chars=high
    )
    kept, want_urls, want_captions, want_dropped = per_row(urls, captions, low, high)
    assert 0 < len(kept) < len(urls) and want_dropped["malformed_url"] > 0

    dropped = Counter()
    index, out_urls, out_captions = clean_batch({"u": urls, "c": captions}, settings, dropped)
    assert index.tolist() == kept and dropped == want_dropped
    assert out_urls.take(pa.array(index)).to_pylist() == want_urls
    assert out_captions.take(pa.array(index)).to_pylist() == want_captions

    urls, captions = urls[:5000], captions[:5000]  # the typed columns hold strings or bytes only
    kept, want_urls, want_captions, want_dropped = per_row(encoded(urls), encoded(captions), low, high)
    for name, url_column, caption_column in column_forms(urls, captions):
        dropped = Counter()
        index, out_urls, out_captions = clean_batch({"u": url_column, "c": caption_column}, settings, dropped)
        assert index.tolist() == kept and dropped == want_dropped, name
        assert out_urls.take(pa.array(index)).to_pylist() == want_urls, name
        assert out_captions.take(pa.array(index)).to_pylist() == want_captions, name


def test_whitespace_sets_are_what_strip_removes():
    assert set(url_rules.ASCII_WHITESPACE) == {chr(code) for code in range(128) if chr(code).isspace()}
    assert set(url_rules.UNICODE_WHITESPACE) == {chr(code) for code in range(128, 0x110000) if chr(code).isspace()}


def write_list(path, rows: list[tuple], row_group_size: int) -> None:
    urls, captions, widths = zip(*rows)
    pq.write_table(
        pa.table({"URL": list(urls), "TEXT": list(captions), "W": pa.array(widths, pa.int32())}),
        path,
        row_group_size=row_group_size,
    )


def test_files_parts_and_partitions_keep_each_urls_first_usable_row(tmp_path, monkeypatch, ray_local):
    monkeypatch.setattr(ul, "TASK_ROWS", 150)  # parquet files split into parts of row groups
    monkeypatch.setattr(ul, "PARTITION_ROWS", 200)  # 900 rows: 5 partitions
    draw = random.Random(7)
    folder = tmp_path / "parts"
    folder.mkdir()
    everything = []
    for number in range(3):
        rows = []
        for row in range(300):
            url = f"http://img.example/{draw.randrange(400)}.jpg"  # many repeats, within and across files
            caption = "" if draw.random() < 0.3 else f"caption {number}-{row}"  # an unusable first row is passed over
            rows.append((url, caption, number * 1000 + row))
        write_list(folder / f"part-{number}.parquet", rows, row_group_size=50)
        everything += rows
    first: dict[str, tuple] = {}
    for url, caption, width in everything:
        if caption and url not in first:
            first[url] = (url, caption, width)

    config = IngestConfig(
        source="urls", url_list=str(folder), url_column="URL", caption_column="TEXT", extra_columns=["W"], samples_per_shard=40
    )
    plan, parts = ul.plan_cleaning(config, RunDir(tmp_path / "run"))
    assert plan.partitions == 5 and len(parts) == 6 and parts[1].row_groups == (3, 4, 5)
    run = RunDir(tmp_path / "run")
    result = prepare_url_list(config, run)
    assert result.rows == 900 and result.kept == len(first)
    assert result.dropped == {
        "caption_too_short": sum(1 for row in everything if not row[1]),
        "duplicate_url": 900 - len(first) - sum(1 for row in everything if not row[1]),
    }
    tables = []
    for path, rows in result.shards:
        with run.open_read(path) as handle:
            tables.append(pq.read_table(handle))
        assert tables[-1].num_rows == rows <= 40
    table = pa.concat_tables(tables)
    assert table.schema.field("W").type == pa.int32()
    got = {row["url"]: (row["url"], row["caption"], row["W"]) for row in table.to_pylist()}
    assert len(got) == table.num_rows and got == first  # every kept URL in exactly one shard, its first usable row
    assert len({path.split("/")[-1].split("-")[0] for path, _ in result.shards}) == 5  # shard ids in (partition, chunk) order
    assert [path for path, _ in result.shards] == sorted(path for path, _ in result.shards)
    assert run.list(layout.INGEST_URLS) == sorted(["index.json", *(p.rsplit("/", 1)[-1] for p, _ in result.shards)])


def test_a_resume_cleans_nothing_and_a_changed_setting_cleans_again(tmp_path, monkeypatch, ray_local):
    source = tmp_path / "urls.parquet"
    write_list(source, [(f"http://a.example/{i}", f"caption {i}", i) for i in range(100)], row_group_size=30)
    config = IngestConfig(source="urls", url_list=str(source), url_column="URL", caption_column="TEXT", samples_per_shard=30)
    run = RunDir(tmp_path / "run")
    first = prepare_url_list(config, run)
    assert [rows for _, rows in first.shards] == [30, 30, 30, 10]
    index = tmp_path / "run" / layout.INGEST_URLS / "index.json"
    written = index.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("cleaned again")

    monkeypatch.setattr(ul, "plan_cleaning", refuse)
    assert prepare_url_list(config, run) == first
    assert index.stat().st_mtime_ns == written
    monkeypatch.undo()

    smaller = config.model_copy(update={"samples_per_shard": 50})
    again = prepare_url_list(smaller, run)
    assert [rows for _, rows in again.shards] == [50, 50] and again.prefilter() == first.prefilter()
    assert sorted(p.name for p in (tmp_path / "run" / layout.INGEST_URLS).iterdir()) == [
        "00000-00000.parquet",
        "00000-00001.parquet",
        "index.json",
    ]


def test_run_directory_on_s3(tmp_path, s3_server, ray_local):
    import boto3

    boto3.client("s3").create_bucket(Bucket="clean-lists")
    source = tmp_path / "urls.parquet"
    write_list(source, [(f"http://a.example/{i % 70}", f"caption {i}", i) for i in range(100)], row_group_size=30)
    config = IngestConfig(source="urls", url_list=str(source), url_column="URL", caption_column="TEXT", samples_per_shard=25)
    run = RunDir("s3://clean-lists/run")
    result = prepare_url_list(config, run)
    assert result.kept == 70 and result.dropped == {"duplicate_url": 30}
    assert run.list(layout.INGEST_URLS) == ["00000-00000.parquet", "00000-00001.parquet", "00000-00002.parquet", "index.json"]
    with run.open_read(result.shards[2][0]) as handle:
        assert pq.read_table(handle).column("url").to_pylist() == [f"http://a.example/{i}" for i in range(50, 70)]
    assert np.sum([rows for _, rows in result.shards]) == 70


def test_a_large_jsonl_file_is_written_out_as_it_is_read(tmp_path, monkeypatch, ray_local):
    monkeypatch.setattr(url_sources, "BATCH_ROWS", 40)
    monkeypatch.setattr(ul, "TASK_ROWS", 100)  # a task writes its kept rows every 100 (one file: one task)
    monkeypatch.setattr(ul, "PARTITION_ROWS", 150)
    lines = [
        {"u": f"http://a.example/{i % 250}", "c": "" if i % 7 == 0 else f"c{i}", "n": i if i != 45 else "five"}
        for i in range(600)
    ]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = IngestConfig(
        source="urls",
        url_list=str(tmp_path / "urls.jsonl"),
        url_column="u",
        caption_column="c",
        extra_columns=["n"],
        samples_per_shard=64,
    )
    first: dict[str, dict] = {}
    for line in lines:
        if line["c"] and line["u"] not in first:
            first[line["u"]] = line
    result = prepare_url_list(config, RunDir(tmp_path / "run"))
    assert result.kept == len(first) == 250 and result.rows == 600
    assert result.nulled == {"n": 1}  # int64 from the first batch: "five" (row 45, kept) does not fit
    run = RunDir(tmp_path / "run")
    rows = []
    for path, count in result.shards:
        with run.open_read(path) as handle:
            shard = pq.read_table(handle).to_pylist()
        assert len(shard) == count <= 64
        rows += shard
    assert {row["url"]: (row["caption"], row["n"]) for row in rows} == {
        url: (line["c"], line["n"] if isinstance(line["n"], int) else None) for url, line in first.items()
    }


def test_a_later_file_whose_extra_column_does_not_fit_fails_naming_it(tmp_path, ray_local):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(
        pa.table({"URL": ["http://a.example/1"], "TEXT": ["one"], "W": pa.array([1], pa.int64())}), folder / "a.parquet"
    )
    pq.write_table(pa.table({"URL": ["http://a.example/2"], "TEXT": ["two"], "W": ["wide"]}), folder / "b.parquet")
    config = IngestConfig(source="urls", url_list=str(folder), url_column="URL", caption_column="TEXT", extra_columns=["W"])
    with pytest.raises(ValueError, match="b.parquet: extra column 'W' does not match the first file's type int64"):
        prepare_url_list(config, RunDir(tmp_path / "run"))  # raised in a Ray task, re-raised here as a ValueError
    assert not (tmp_path / "run" / ul.INDEX).exists()
