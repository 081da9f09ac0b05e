"""Per-sample outcome classification and the aggregation of img2dataset's shard files (via per-shard outcomes)."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.download.accounting import REASONS, classify, run_stats
from pipeline.core import layout
from pipeline.core.rundir import RunDir

# Messages as img2dataset 1.47 records them (urllib/http.client, cv2 4.14, Pillow), collected by
# running its download_image and Resizer against a loopback server and crafted bytes.
CV2_EMPTY = "OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:1310: error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'\n"
CV2_BOMB = "OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'\n"
MESSAGES = [
    ("success", None, "success"),
    ("failed_to_download", "HTTP Error 404: Not Found", "http_error"),
    ("failed_to_download", "HTTP Error 403: Forbidden", "http_error"),
    ("failed_to_download", "HTTP Error 500: Internal Server Error", "http_error"),
    (
        "failed_to_download",
        "HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\nThe last 30x error message was:\nFound",
        "http_error",
    ),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "The read operation timed out", "timeout"),
    ("failed_to_download", "<urlopen error [Errno 110] Connection timed out>", "timeout"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "connection_error"),
    ("failed_to_download", "<urlopen error [Errno -3] Temporary failure in name resolution>", "connection_error"),
    ("failed_to_download", "Remote end closed connection without response", "connection_error"),
    ("failed_to_download", "IncompleteRead(3 bytes read, 997 more expected)", "connection_error"),
    ("failed_to_download", "[Errno 104] Connection reset by peer", "connection_error"),
    ("failed_to_download", "<urlopen error [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)>", "connection_error"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opt_out"),
    ("failed_to_download", "<urlopen error refused non-public address 10.1.2.3 for host 10.1.2.3>", "refused_address"),
    ("failed_to_download", "refused non-public address 169.254.169.254", "refused_address"),
    ("failed_to_download", "refused: image of 900.0 megapixels exceeds the limit of 50", "too_large"),
    ("failed_to_resize", "Image decoding error", "not_an_image"),
    ("failed_to_resize", CV2_EMPTY, "not_an_image"),
    ("failed_to_resize", "cannot identify image file <_io.BytesIO object at 0x7f>", "not_an_image"),
    ("failed_to_resize", "image too small", "too_small"),
    ("failed_to_resize", "image area too large", "too_large"),
    ("failed_to_resize", CV2_BOMB, "too_large"),
    (
        "failed_to_resize",
        "Image size (10000 pixels) exceeds limit of 2000 pixels, could be decompression bomb DOS attack.",
        "too_large",
    ),
    ("failed_to_resize", "aspect ratio too large", "other"),
    ("failed_to_download", "hash mismatch", "other"),
    ("failed_to_download", "unknown url type: 'not a url'", "other"),
    ("failed_to_download", "URL can't contain control characters. 'exa mple.com' (found at least ' ')", "other"),
    ("failed_to_download", "'ascii' codec can't encode character '\\xe9' in position 8: ordinal not in range(128)", "other"),
    ("failed_to_download", None, "other"),
    (None, None, "other"),
]


# The egress guard's refusals, as ingest/download/egress.py words them (URLError-wrapped by urllib).
MESSAGES += [
    ("failed_to_download", "<urlopen error refused non-public address 10.1.2.3 for host '10.1.2.3'>", "refused_address"),
    ("failed_to_download", "<urlopen error refused URL scheme 'file': file:///etc/passwd>", "refused_address"),
    (
        "failed_to_download",
        "<urlopen error refused redirect to non-http(s) URL 'ftp://x/timed out' (from http://a/)>",
        "refused_address",
    ),
    (
        "failed_to_download",
        "<urlopen error refused decompression bomb: 30000x30000, 900.0 MP over the 50 MP limit (http://a/x-robots-tag)>",
        "too_large",
    ),
    ("failed_to_download", "<urlopen error refused oversized response: more than 67108864 bytes from http://a/b>", "too_large"),
    ("failed_to_download", "<urlopen error getaddrinfo returned no address for 'a.example'>", "connection_error"),
]


def test_egress_phrases_are_classified():
    from ingest.download import egress  # a plain import: an error in our own module fails, never skips

    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_ADDRESS} 10.0.0.1>") == "refused_address"
    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_SCHEME} 'gopher'>") == "refused_address"
    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_REDIRECT} 'file:///x'>") == "refused_address"
    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_BOMB}: 900 MP>") == "too_large"
    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_SIZE}: 1 GB>") == "too_large"
    assert classify("failed_to_resize", f"OpenCV error: pixels <= {egress.CV2_PIXEL_LIMIT_MESSAGE}") == "too_large"
    assert classify("failed_to_download", f"<urlopen error {egress.REFUSED_DEADLINE}: no complete answer in 60 s>") == "timeout"


@pytest.mark.parametrize("status, message, reason", MESSAGES)
def test_classify_real_messages(status, message, reason):
    assert classify(status, message) == reason
    assert reason == "success" or reason in REASONS


# ------------------------------------------------------------------ fake img2dataset shards
SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("punsafe", pa.float64()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def write_shard(run: RunDir, shard: int, outcomes: list[tuple[str, str | None]], stats: bool = True, count: int | None = None):
    """NNNNN.tar (successes only), NNNNN.parquet (every sample) and, unless stats=False, NNNNN_stats.json."""
    name = f"{shard:05d}"
    rows, archive_bytes = [], io.BytesIO()
    with tarfile.open(fileobj=archive_bytes, mode="w") as archive:
        for i, (status, message) in enumerate(outcomes):
            key = f"{shard:05d}{i:04d}"
            ok = status == "success"
            rows.append(
                {
                    "url": f"http://img.example.com/{key}.jpg",
                    "caption": f"caption {key}",
                    "punsafe": 0.1,
                    "key": key,
                    "status": status,
                    "error_message": message,
                    "width": 64 if ok else None,
                    "height": 64 if ok else None,
                    "original_width": 100 if ok else None,
                    "original_height": 80 if ok else None,
                    "sha256": "0" * 64 if ok else None,
                }
            )
            if ok:
                for ext, data in (("jpg", b"\xff\xd8fakejpeg\xff\xd9"), ("txt", f"caption {key}".encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    run.write_bytes(f"{layout.INGEST_SHARDS}/{name}.tar", archive_bytes.getvalue())
    table_bytes = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), table_bytes)
    run.write_bytes(f"{layout.INGEST_SHARDS}/{name}.parquet", table_bytes.getvalue())
    if stats:
        status_dict = {}
        for status, message in outcomes:
            label = "success" if status == "success" else message
            status_dict[label] = status_dict.get(label, 0) + 1
        run.write_json(
            f"{layout.INGEST_SHARDS}/{name}_stats.json",
            {
                "count": len(outcomes) if count is None else count,
                "successes": sum(s == "success" for s, _ in outcomes),
                "failed_to_download": sum(s == "failed_to_download" for s, _ in outcomes),
                "failed_to_resize": sum(s == "failed_to_resize" for s, _ in outcomes),
                "duration": 1.5,
                "start_time": 1000.0,
                "end_time": 1001.5,
                "status_dict": status_dict,
            },
        )
    return len(archive_bytes.getvalue())


def test_aggregate_counts_complete_shards_only(tmp_path):
    run = RunDir(tmp_path / "run")
    ok = ("success", None)
    size0 = write_shard(
        run,
        0,
        [
            ok,
            ok,
            ok,
            ("failed_to_download", "HTTP Error 404: Not Found"),
            ("failed_to_download", "timed out"),
            ("failed_to_resize", "Image decoding error"),
        ],
    )
    size1 = write_shard(
        run,
        1,
        [
            ok,
            ok,
            ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"),
            ("failed_to_download", "<urlopen error refused non-public address 10.1.2.3>"),
            ("failed_to_resize", "image too small"),
            ("failed_to_resize", "image area too large"),
            ("failed_to_download", "HTTP Error 404: Not Found"),
        ],
    )
    write_shard(run, 2, [ok, ok, ("failed_to_download", "HTTP Error 500: Internal Server Error")], stats=False)  # killed
    # one sample the stats count but no parquet row records (img2dataset dropped it): 'other'
    size3 = write_shard(run, 3, [ok], count=2)
    prefilter = {"rows": 30, "kept": 16, "dropped": {"malformed_url": 2, "duplicate_url": 1, "filtered:punsafe": 11}}

    stats = run_stats(run, prefilter)
    assert stats == {
        "attempted": 6 + 7 + 2,
        "succeeded": 3 + 2 + 1,
        "failed": {
            "http_error": 2,
            "timeout": 1,
            "not_an_image": 1,
            "too_small": 1,
            "too_large": 1,
            "opt_out": 1,
            "refused_address": 1,
            "other": 1,
        },
        "prefiltered": {"malformed_url": 2, "duplicate_url": 1, "filtered:punsafe": 11},
        "shards": 3,
        "incomplete_shards": ["00002"],
        "bytes": size0 + size1 + size3,
    }
    assert stats["succeeded"] + sum(stats["failed"].values()) == stats["attempted"]
    assert run_stats(run, prefilter["dropped"])["prefiltered"] == stats["prefiltered"]  # the dropped dict alone works too
    json.dumps(stats)  # stats.json content


def test_aggregate_falls_back_on_stats_when_the_parquet_is_unreadable(tmp_path):
    run = RunDir(tmp_path / "run")
    write_shard(run, 0, [("success", None), ("failed_to_download", "HTTP Error 404: Not Found")])
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.parquet", b"PAR1 truncated")
    stats = run_stats(run, None)
    assert stats["attempted"] == 2 and stats["succeeded"] == 1 and stats["failed"] == {"http_error": 1}
    assert stats["prefiltered"] == {} and stats["incomplete_shards"] == []


def test_aggregate_of_an_empty_run(tmp_path):
    stats = run_stats(RunDir(tmp_path / "run"), None)
    assert stats == {
        "attempted": 0,
        "succeeded": 0,
        "failed": {},
        "prefiltered": {},
        "shards": 0,
        "incomplete_shards": [],
        "bytes": 0,
    }


def test_aggregate_on_a_memory_run():
    run = RunDir("memory://accounting-test/run")
    try:
        size = write_shard(run, 0, [("success", None), ("failed_to_download", "timed out")])
        stats = run_stats(run, None)
        assert (stats["attempted"], stats["succeeded"], stats["failed"], stats["bytes"]) == (2, 1, {"timeout": 1}, size)
    finally:
        run.remove("")
