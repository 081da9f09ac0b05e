"""URL-list cleaning on real parquet, CSV (plain and gzip), JSONL and memory:// files, as Ray tasks
(the `ray_local` fixture) writing one parquet per shard into the run directory."""

import csv
import gzip
import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.download import url_list as ul
from ingest.download import url_sources
from ingest.download.url_list import CleanList, prepare_url_list
from ingest.download.url_rules import clean_caption, clean_url
from pipeline.core import layout
from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(autouse=True)
def through_ray_tasks(monkeypatch):
    """These lists are small: without this, the driver would clean them itself (INLINE_ROWS)."""
    monkeypatch.setattr(ul, "INLINE_ROWS", 0)


HUGE = "x" * 1_000_000

# (URL, TEXT, WIDTH, HEIGHT, punsafe); TEXT may be bytes (a non-UTF-8 caption), punsafe a string.
ROWS = [
    ("http://img.example.com/1.jpg", "a red circle", 640, 480, 0.01),  # kept
    ("  https://img.example.com/2.png  ", "  a blue square ", 800, 600, 0.2),  # kept, both stripped
    ("ftp://x", "ftp", 1, 1, 0.0),  # malformed
    ("not a url", "spaces", 1, 1, 0.0),  # malformed
    ("http://", "no host", 1, 1, 0.0),  # malformed
    ("javascript:alert(1)", "script", 1, 1, 0.0),  # malformed
    (None, "no url", 1, 1, 0.0),  # malformed
    ("http://img.example.com/1.jpg", "duplicate of the first", 2, 2, 0.0),  # duplicate
    ("http://img.example.com/3.jpg", "", 3, 3, 0.0),  # too short
    ("http://img.example.com/4.jpg", HUGE, 4, 4, 0.0),  # too long
    ("http://img.example.com/5.jpg", b"\xff\xfe", 5, 5, 0.0),  # not UTF-8
    ("http://img.example.com/6.jpg", "unsafe", 6, 6, 0.9),  # filtered:punsafe (above max)
    ("http://img.example.com/7.jpg", "unknown safety", 7, 7, "n/a"),  # filtered:punsafe (non-numeric)
    ("http://img.example.com/8.jpg", "a green triangle", 1024, 768, 0.5),  # kept (max is inclusive)
]
EXPECTED_DROPPED = {
    "malformed_url": 5,
    "caption_not_utf8": 1,
    "caption_too_short": 1,
    "caption_too_long": 1,
    "filtered:punsafe": 2,
    "duplicate_url": 1,
}
KEPT = [
    ("http://img.example.com/1.jpg", "a red circle", 640, 480),
    ("https://img.example.com/2.png", "a blue square", 800, 600),
    ("http://img.example.com/8.jpg", "a green triangle", 1024, 768),
]


def settings(url_list: str, **overrides) -> IngestConfig:
    values = dict(
        source="urls",
        url_list=url_list,
        url_column="URL",
        caption_column="TEXT",
        extra_columns=["WIDTH", "HEIGHT", "punsafe"],
        filters={"punsafe": {"max": 0.5}},
        min_caption_chars=1,
        max_caption_chars=2000,
    )
    values.update(overrides)
    return IngestConfig(**values)


def write_parquet(path) -> None:
    table = pa.table(
        {
            "URL": pa.array([row[0] for row in ROWS], pa.string()),
            "TEXT": pa.array([row[1].encode() if isinstance(row[1], str) else row[1] for row in ROWS], pa.binary()),
            "WIDTH": pa.array([row[2] for row in ROWS], pa.int64()),
            "HEIGHT": pa.array([row[3] for row in ROWS], pa.int64()),
            "punsafe": pa.array([str(row[4]) for row in ROWS], pa.string()),  # mixed: a number stored as text, "n/a"
            "similarity": pa.array([0.3] * len(ROWS), pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=4)  # several row groups: the batches are streamed


def csv_bytes() -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["URL", "TEXT", "WIDTH", "HEIGHT", "punsafe", "similarity"])
    marker = "@@NOT_UTF8@@"
    for url, caption, width, height, punsafe in ROWS:
        writer.writerow(
            ["" if url is None else url, marker if isinstance(caption, bytes) else caption, width, height, punsafe, 0.3]
        )
    return text.getvalue().encode("utf-8").replace(marker.encode(), b"\xff\xfe")


def jsonl_bytes() -> bytes:
    lines = []
    for url, caption, width, height, punsafe in ROWS:
        if isinstance(caption, bytes):
            line = json.dumps({"URL": url, "TEXT": "@@", "WIDTH": width, "HEIGHT": height, "punsafe": punsafe})
            lines.append(line.encode().replace(b"@@", caption))  # raw invalid bytes inside the JSON string
        else:
            lines.append(json.dumps({"URL": url, "TEXT": caption, "WIDTH": width, "HEIGHT": height, "punsafe": punsafe}).encode())
    return b"\n".join(lines) + b"\n"


def clean(config: IngestConfig, run_dir) -> dict:
    """prepare_url_list into a run at `run_dir`: its prefilter counts, checked against the shards on disk."""
    run = RunDir(run_dir)
    result = prepare_url_list(config, run)
    assert isinstance(result, CleanList)
    assert result.kept == sum(rows for _, rows in result.shards) == output_table(run).num_rows
    assert all(0 < rows <= config.samples_per_shard for _, rows in result.shards)
    assert set(run.list(layout.INGEST_URLS)) == {"index.json", *(path.rsplit("/", 1)[-1] for path, _ in result.shards)}
    return result.prefilter()


def output_table(run_dir) -> pa.Table:
    """Every shard of the cleaned list, concatenated in shard-id order."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    shards = run.read_json(ul.INDEX)["shards"]
    tables = []
    for path, rows in shards:
        with run.open_read(path) as handle:
            table = pq.read_table(handle)
        assert table.num_rows == rows
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({"url": pa.array([], pa.string())})


def read_output(run_dir) -> list[tuple]:
    table = output_table(run_dir)
    assert table.column_names == ["url", "caption", "WIDTH", "HEIGHT", "punsafe"]
    return [(r["url"], r["caption"], r["WIDTH"], r["HEIGHT"]) for r in table.to_pylist()]


def check(result: dict, run_dir) -> pa.Table:
    assert result["rows"] == len(ROWS)
    assert result["dropped"] == EXPECTED_DROPPED
    assert result["kept"] == len(KEPT) == result["rows"] - sum(result["dropped"].values())
    assert read_output(run_dir) == KEPT
    return output_table(run_dir)


def test_parquet_rows_are_cleaned_and_counted(tmp_path):
    source = tmp_path / "urls.parquet"
    write_parquet(source)
    result = clean(settings(str(source)), tmp_path / "run")
    table = check(result, tmp_path / "run")
    assert table.schema.field("WIDTH").type == pa.int64()  # parquet types pass through
    assert table.column("punsafe").to_pylist() == ["0.01", "0.2", "0.5"]
    assert result["nulled"] == {}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["ingest"]  # no scratch left behind


@pytest.mark.parametrize("name", ["urls.csv", "urls.csv.gz"])
def test_csv_plain_and_gzip(tmp_path, name):
    data = csv_bytes()
    source = tmp_path / name
    source.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    result = clean(settings(str(source)), tmp_path / "run")
    table = check(result, tmp_path / "run")
    assert table.schema.field("WIDTH").type == pa.int64()  # inferred from the text
    assert table.schema.field("punsafe").type == pa.string()  # "n/a" in the first batch: text


def test_jsonl_with_raw_invalid_bytes(tmp_path):
    source = tmp_path / "urls.jsonl"
    source.write_bytes(jsonl_bytes() + b"{not json\n[1, 2]\n\n")  # two malformed rows; the blank line is no row
    result = clean(settings(str(source)), tmp_path / "run")
    assert result["rows"] == len(ROWS) + 2
    assert result["dropped"] == {"malformed_row": 2, **EXPECTED_DROPPED}
    assert read_output(tmp_path / "run") == KEPT
    table = output_table(tmp_path / "run")
    # punsafe mixes numbers and "n/a" in the first batch: a string column, the row itself filtered
    assert table.schema.field("punsafe").type == pa.string()


def test_memory_url_list_and_explicit_format(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/lists/laion-part.data", jsonl_bytes())
    try:
        with pytest.raises(ValueError, match="url_list_format"):  # no known extension, format "auto"
            prepare_url_list(settings("memory://lists/laion-part.data"), RunDir(tmp_path / "run"))
        config = settings("memory://lists/laion-part.data", url_list_format="jsonl")
        result = clean(config, "memory://runs/one")  # memory:// exists in this process only: no Ray task
        assert result["dropped"] == EXPECTED_DROPPED
        assert read_output("memory://runs/one") == KEPT
    finally:
        fs.rm("/lists", recursive=True)
        fs.rm("/runs", recursive=True)


def test_folder_of_parts_deduplicates_across_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet")
    write_parquet(folder / "part-1.parquet")  # every URL again: all duplicates or bad
    (folder / "_SUCCESS").write_text("")
    result = clean(settings(str(folder)), tmp_path / "run")
    assert result["rows"] == 2 * len(ROWS)
    assert result["dropped"]["duplicate_url"] == 1 + len(KEPT) + 1  # the second file's kept rows and its duplicate
    assert read_output(tmp_path / "run") == KEPT


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_missing_column_fails_fast_naming_it(tmp_path, fmt):
    source = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        write_parquet(source)
    elif fmt == "csv":
        source.write_bytes(csv_bytes())
    else:
        source.write_bytes(jsonl_bytes())
    config = settings(str(source), caption_column="caption", filters={"pwatermark": {"max": 0.8}})
    with pytest.raises(ValueError) as error:
        prepare_url_list(config, RunDir(tmp_path / "run"))
    message = str(error.value)
    assert "'caption' (ingest.caption_column)" in message and "'pwatermark' (ingest.filters.pwatermark)" in message
    assert str(source) in message and "'TEXT'" in message  # the file and the columns it has
    assert not (tmp_path / "run").exists()


def test_reserved_extra_column_is_refused(tmp_path):
    source = tmp_path / "urls.parquet"
    write_parquet(source)
    with pytest.raises(ValueError, match="width"):
        prepare_url_list(settings(str(source), extra_columns=["width"]), RunDir(tmp_path / "run"))


def test_min_zero_keeps_empty_and_none_captions(tmp_path):
    source = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["http://a.example/1", "http://a.example/2"], "TEXT": ["", None]}), source)
    result = clean(settings(str(source), extra_columns=[], filters={}, min_caption_chars=0), tmp_path / "run")
    assert result == {"rows": 2, "kept": 2, "dropped": {}, "nulled": {}}
    assert output_table(tmp_path / "run").column("caption").to_pylist() == ["", ""]


def test_csv_extra_values_that_do_not_fit_are_nulled_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(url_sources, "BATCH_ROWS", 2)  # the type is fixed by the first batch of two rows
    source = tmp_path / "urls.csv"
    source.write_text("URL,TEXT,WIDTH\nhttp://a.example/1,a,640\nhttp://a.example/2,b,480\nhttp://a.example/3,c,wide\n")
    result = clean(settings(str(source), extra_columns=["WIDTH"], filters={}), tmp_path / "run")
    assert result["kept"] == 3 and result["nulled"] == {"WIDTH": 1}
    assert output_table(tmp_path / "run").column("WIDTH").to_pylist() == [640, 480, None]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("http://a.example/x.jpg", "http://a.example/x.jpg"),
        (" https://a.example:8443/x?q=1 ", "https://a.example:8443/x?q=1"),
        (b"http://a.example/b", "http://a.example/b"),
        ("http://a.example/caf\u00e9.jpg", "http://a.example/caf\u00e9.jpg"),
        ("ftp://x", None),
        ("not a url", None),
        ("http://", None),
        ("javascript:alert(1)", None),
        (None, None),
        (float("nan"), None),
        (42, None),
        ("", None),
        ("http://a.example/\tx", None),
        ("http://a.example/\x00", None),
        ("http://a.example/" + "a" * 2048, None),
        ("http://[::1/x", None),
        ("http://a.example:99999/", None),
        (b"http://a.example/\xff", None),
        ("http://a.example/\udcff", None),
        ("HTTP://A.EXAMPLE/x", "HTTP://A.EXAMPLE/x"),
    ],
)
def test_clean_url(value, expected):
    assert clean_url(value) == expected


def test_clean_caption():
    assert clean_caption("  a cat ", 1, 10) == ("a cat", None)
    assert clean_caption(None, 1, 10) == (None, "caption_too_short")
    assert clean_caption("   ", 1, 10) == (None, "caption_too_short")
    assert clean_caption("x" * 11, 1, 10) == (None, "caption_too_long")
    assert clean_caption(b"\xff\xfe", 1, 10) == (None, "caption_not_utf8")
    assert clean_caption("caf\udcff", 1, 10) == (None, "caption_not_utf8")
    assert clean_caption("caf\u00e9".encode(), 1, 10) == ("caf\u00e9", None)
    assert clean_caption(1234, 1, 10) == ("1234", None)


@pytest.mark.parametrize("planted", ["../../victim.parquet", "/etc/passwd", "ingest/urls/../../../victim.parquet"])
def test_an_index_naming_a_file_outside_the_cleaned_list_is_refused(tmp_path, planted):
    """index.json is read back on resume: a path planted in it must not be read (nor its shard written)."""
    source = tmp_path / "urls.parquet"
    write_parquet(source)
    config, run = settings(str(source)), RunDir(tmp_path / "run")
    run.write_json(
        ul.INDEX,
        {"fingerprint": ul.fingerprint(config), "rows": 1, "kept": 1, "dropped": {}, "nulled": {}, "shards": [[planted, 1]]},
    )
    with pytest.raises(ValueError, match="refused"):
        prepare_url_list(config, run)
