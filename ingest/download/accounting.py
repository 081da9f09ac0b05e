"""Per-sample outcomes of img2dataset -> the counted reasons of `ingest/stats.json`.

img2dataset 1.47 writes, per shard, `NNNNN.tar`, `NNNNN.parquet` (one row per attempted
sample: `status` in {success, failed_to_download, failed_to_resize} and `error_message`)
and, last, `NNNNN_stats.json`. A shard without its stats file was killed mid-way: it is
listed as incomplete and none of its rows are counted.

`classify` maps one (status, error_message) to a reason. The messages it knows, as
img2dataset and the libraries under it write them (seen with urllib/http.client of
Python 3.11, OpenCV 4.14, Pillow 13):

    http_error        "HTTP Error 404: Not Found", "HTTP Error 302: The HTTP server returned a
                      redirect error that would lead to an infinite loop..."
    timeout           "timed out", "<urlopen error timed out>", "The read operation timed out",
                      "<urlopen error [Errno 110] Connection timed out>"
    connection_error  "<urlopen error [Errno 111] Connection refused>", "<urlopen error [Errno -2]
                      Name or service not known>", "Remote end closed connection without
                      response", "IncompleteRead(3 bytes read, 997 more expected)",
                      "[Errno 104] Connection reset by peer", "<urlopen error [SSL: ...]>"
    opt_out           "Use of image disallowed by X-Robots-Tag directive"
    not_an_image      "Image decoding error" (cv2.imdecode gave None: garbage, truncated),
                      "OpenCV(...) error: (-215:Assertion failed) !buf.empty() ..." (empty body),
                      PIL's "cannot identify image file"
    too_small         "image too small"
    too_large         "image area too large" (max_image_area), "... pixels <=
                      CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'", PIL's
                      "... could be decompression bomb DOS attack.", the egress guard's
                      "refused decompression bomb: ...", "refused oversized response: ..."
                      (and "refused: image of ...")
    refused_address   the egress guard (ingest/download/egress.py): "refused non-public address ...",
                      "refused URL scheme ...", "refused redirect to non-http(s) URL ..."
    other             everything else ("aspect ratio too large", "hash mismatch", "unknown url
                      type: ...", "URL can't contain control characters...", ...)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir, complete_shard_ids

SUCCESS = "success"
REASONS = (
    "http_error",
    "timeout",
    "connection_error",
    "not_an_image",
    "too_small",
    "too_large",
    "opt_out",
    "refused_address",
    "other",
)

_HTTP_ERROR = re.compile(r"\bhttp error \d{3}\b")
# Checked in this order. The egress guard's refusals (ingest/download/egress.py: REFUSED_* phrases)
# come first: they may quote a URL, which could contain any later needle, and they may be
# wrapped in urllib's "<urlopen error ...>". A timeout beats "connection error".
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "refused_address",
        (
            "refused non-public address",
            "refused url scheme",
            "refused redirect to non-http",
        ),
    ),
    (
        "too_large",
        (
            "refused decompression bomb",
            "refused oversized response",
            "refused: image of",
            "image area too large",
            "cv_io_max_image_pixels",
            "decompression bomb",
            "exceeds limit of",
        ),
    ),
    ("opt_out", ("x-robots-tag",)),
    ("too_small", ("image too small",)),
    ("timeout", ("timed out", "timeout")),
)
_NOT_AN_IMAGE = (
    "image decoding error",
    "cannot identify image file",
    "image file is truncated",
    "!buf.empty()",
    "opencv(",
    "not a jpeg",
    "not a png",
)
_CONNECTION = (
    "<urlopen error",
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated",
    "returned no address",
    "network is unreachable",
    "no route to host",
    "incompleteread",
    "broken pipe",
    "ssl",
    "certificate",
    "[errno",
)


def classify(status: str | None, error_message: str | None) -> str:
    """One reason for a sample: 'success' or one of REASONS."""
    if status == SUCCESS:
        return SUCCESS
    message = (error_message or "").lower()
    for reason, needles in _RULES:
        if any(needle in message for needle in needles):
            return reason
    if _HTTP_ERROR.search(message):
        return "http_error"
    if any(needle in message for needle in _NOT_AN_IMAGE):
        return "not_an_image"
    if any(needle in message for needle in _CONNECTION):
        return "connection_error"
    return "other"


def _shard_ids(run: RunDir) -> tuple[list[str], list[str]]:
    """(complete shard ids, incomplete shard ids), e.g. '00003'; complete = its stats file exists."""
    names = run.list(layout.INGEST_SHARDS)
    complete = [f"{shard:05d}" for shard in sorted(complete_shard_ids(run))]
    started = {name.rsplit(".", 1)[0] for name in names if name.endswith((".tar", ".parquet"))}
    return complete, sorted(started - set(complete))


def _size(run: RunDir, relative: str) -> int:
    try:
        return int(run.fs.size(run.path(relative)) or 0)
    except FileNotFoundError:
        return 0


def _shard_reasons(run: RunDir, shard: str, stats: dict[str, Any]) -> Counter[str]:
    """Reasons of one complete shard's samples, from its parquet (one row per sample).

    Falls back on the stats file's `status_dict` (message -> count, capped by img2dataset)
    when the parquet is missing or unreadable. Samples the stats count but no row records
    (img2dataset drops a row when writing it raised) are counted as 'other'.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    reasons: Counter[str] = Counter()
    try:
        data = run.read_bytes(f"{layout.INGEST_SHARDS}/{shard}.parquet")
        table = pq.read_table(pa.BufferReader(data), columns=["status", "error_message"])
        pairs = Counter(zip(table.column("status").to_pylist(), table.column("error_message").to_pylist()))
        for (status, message), count in pairs.items():
            reasons[classify(status, message)] += count
    except (OSError, ValueError, KeyError, pa.ArrowException):
        for message, count in (stats.get("status_dict") or {}).items():
            reasons[SUCCESS if message == SUCCESS else classify("failed", message)] += int(count)
    missing = int(stats.get("count", 0)) - sum(reasons.values())
    if missing > 0:
        reasons["other"] += missing
    return reasons


def aggregate(run: RunDir, prefilter: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of `ingest/stats.json` over the run's complete shards.

    attempted: samples sent to img2dataset (its stats' `count`); succeeded: samples written
    to a tar; failed: {reason: count}, non-zero only, reasons from `classify`, summing with
    succeeded to attempted; prefiltered: rows `prepare_url_list` dropped, {reason: count}
    (pass its whole result or its "dropped" dict); shards: complete shards;
    incomplete_shards: ids of shards with files but no stats (not counted); bytes: total
    size of the complete shards' tars.
    """
    complete, incomplete = _shard_ids(run)
    attempted = 0
    bytes_total = 0
    reasons: Counter[str] = Counter()
    for shard in complete:
        stats = json.loads(run.read_bytes(f"{layout.INGEST_SHARDS}/{shard}{layout.SHARD_STATS_SUFFIX}"))
        attempted += int(stats.get("count", 0))
        reasons.update(_shard_reasons(run, shard, stats))
        bytes_total += _size(run, f"{layout.INGEST_SHARDS}/{shard}.tar")
    dropped = (prefilter or {}).get("dropped", prefilter or {})
    return {
        "attempted": attempted,
        "succeeded": reasons[SUCCESS],
        "failed": {reason: reasons[reason] for reason in REASONS if reasons[reason]},
        "prefiltered": {reason: int(count) for reason, count in dropped.items() if count},
        "shards": len(complete),
        "incomplete_shards": incomplete,
        "bytes": bytes_total,
    }


__all__ = ["REASONS", "SUCCESS", "aggregate", "classify"]
