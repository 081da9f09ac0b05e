"""Per-sample outcomes of img2dataset -> the counted reasons of `ingest/stats.json`.

img2dataset 1.47 writes, per shard, `NNNNN.tar`, `NNNNN.parquet` (one row per attempted
sample: `status` in {success, failed_to_download, failed_to_resize} and `error_message`)
and, last, `NNNNN_stats.json`. A shard without its stats file was killed mid-way: it is
listed as incomplete and none of its rows are counted.

Each download task reduces its own shard to an outcome (`shard_outcome`: attempted,
succeeded, failed by reason, bytes) and records it as `NNNNN_outcome.json` after the stats
file; the driver only adds outcomes up (`aggregate`), so its work is O(shards) with no
per-sample or per-shard file reads, and a resumed run reads the small records of the shards
finished before it (`read_outcomes`).

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir

SUCCESS = "success"
# Written by the download task after img2dataset's stats file: the shard's counts, so that the
# driver (and a resumed run) reads one small record per shard instead of its parquet.
OUTCOME_SUFFIX = "_outcome.json"
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


def shard_width(shards: int) -> int:
    """Digits of a shard's file names (img2dataset's oom_shard_count): 5, or more for a longer list."""
    return max(5, len(str(shards)))


def shard_name(shard_id: int, width: int) -> str:
    """'00003' for shard 3 at width 5: the stem of its tar, parquet, stats and outcome files."""
    return f"{shard_id:0{width}d}"


def outcome_path(name: str) -> str:
    """Run-relative path of a shard's outcome record."""
    return f"{layout.INGEST_SHARDS}/{name}{OUTCOME_SUFFIX}"


@dataclass
class ShardListing:
    """What one listing of `ingest/shards` tells about each shard."""

    complete: dict[int, str]
    """Shard id -> name, for the shards whose stats file exists (img2dataset writes it last)."""
    incomplete: list[str]
    """Names of shards with a tar or parquet but no stats file: killed mid-way, never counted."""
    recorded: set[int]
    """Complete shards whose outcome record exists."""


def list_shards(run: RunDir) -> ShardListing:
    """One listing of the run's raw shards (O(shards), whatever the name width)."""
    stems: dict[str, set[str]] = {}
    for name in run.list(layout.INGEST_SHARDS):
        for suffix in (layout.SHARD_STATS_SUFFIX, OUTCOME_SUFFIX, ".tar", ".parquet"):
            if name.endswith(suffix) and name[: -len(suffix)].isdigit():
                stems.setdefault(name[: -len(suffix)], set()).add(suffix)
    complete = {int(stem): stem for stem, kinds in stems.items() if layout.SHARD_STATS_SUFFIX in kinds}
    started = [stem for stem, kinds in stems.items() if kinds & {".tar", ".parquet"} and layout.SHARD_STATS_SUFFIX not in kinds]
    recorded = {int(stem) for stem, kinds in stems.items() if {layout.SHARD_STATS_SUFFIX, OUTCOME_SUFFIX} <= kinds}
    return ShardListing(dict(sorted(complete.items())), sorted(started), recorded)


def _size(run: RunDir, relative: str) -> int:
    try:
        return int(run.fs.size(run.path(relative)) or 0)
    except FileNotFoundError:
        return 0


def _shard_reasons(run: RunDir, name: str, stats: dict[str, Any]) -> Counter[str]:
    """Reasons of one complete shard's samples, from its parquet (one row per sample).

    Falls back on the stats file's `status_dict` (message -> count, capped by img2dataset)
    when the parquet is missing or unreadable. Samples the stats count but no row records
    (img2dataset drops a row when writing it raised) are counted as 'other'.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    reasons: Counter[str] = Counter()
    try:
        data = run.read_bytes(f"{layout.INGEST_SHARDS}/{name}.parquet")
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


def shard_outcome(run: RunDir, name: str) -> dict[str, Any]:
    """The outcome of one complete shard, from its own files (stats, parquet, tar size).

    {"shard": id, "attempted": samples sent to img2dataset (its stats' `count`), "succeeded":
    samples in the tar, "failed": {reason: count} (non-zero only, summing with succeeded to
    attempted), "bytes": size of the tar}. The download task computes it, so the driver never
    reads a shard's files.
    """
    stats = json.loads(run.read_bytes(f"{layout.INGEST_SHARDS}/{name}{layout.SHARD_STATS_SUFFIX}"))
    reasons = _shard_reasons(run, name, stats)
    return {
        "shard": int(name),
        "attempted": int(stats.get("count", 0)),
        "succeeded": reasons[SUCCESS],
        "failed": {reason: reasons[reason] for reason in REASONS if reasons[reason]},
        "bytes": _size(run, f"{layout.INGEST_SHARDS}/{name}.tar"),
    }


def record_outcome(run: RunDir, name: str) -> dict[str, Any]:
    """`shard_outcome`, persisted next to the shard (after its stats file) so a resumed run reads only this."""
    outcome = shard_outcome(run, name)
    run.write_json(outcome_path(name), outcome)
    return outcome


def _parse_outcome(data: bytes, shard_id: int) -> dict[str, Any] | None:
    try:
        outcome = json.loads(data)
    except ValueError:
        return None
    keys = ("shard", "attempted", "succeeded", "failed", "bytes")
    if not isinstance(outcome, dict) or any(key not in outcome for key in keys) or outcome["shard"] != shard_id:
        return None
    return outcome


def read_outcomes(
    run: RunDir, listing: ShardListing | None = None, shard_ids: Iterable[int] | None = None
) -> dict[int, dict[str, Any]]:
    """Shard id -> outcome, for the run's complete shards (or those of them in `shard_ids`).

    The outcome records are read in one concurrent call (`RunDir.read_many`); a complete shard
    without a readable record (finished by an older version, or killed between its stats file
    and its record) has its outcome computed from its files here, and recorded.
    """
    listing = listing or list_shards(run)
    wanted = listing.complete if shard_ids is None else {i: listing.complete[i] for i in shard_ids if i in listing.complete}
    recorded = {shard_id: outcome_path(name) for shard_id, name in wanted.items() if shard_id in listing.recorded}
    found = run.read_many(list(recorded.values()))
    outcomes: dict[int, dict[str, Any]] = {}
    for shard_id, name in wanted.items():
        data = found.get(recorded.get(shard_id, ""))
        outcome = _parse_outcome(data, shard_id) if data is not None else None
        outcomes[shard_id] = outcome if outcome is not None else record_outcome(run, name)
    return outcomes


def aggregate(
    outcomes: Iterable[dict[str, Any]], prefilter: dict[str, Any] | None = None, incomplete: Iterable[str] = ()
) -> dict[str, Any]:
    """The content of `ingest/stats.json` from per-shard outcomes (`shard_outcome`): O(shards).

    attempted: samples sent to img2dataset; succeeded: samples written to a tar; failed:
    {reason: count}, non-zero only, reasons from `classify`, summing with succeeded to
    attempted; prefiltered: rows the URL list's cleaning dropped, {reason: count} (pass
    `CleanList.prefilter()` or its "dropped" dict); shards: complete shards (one outcome
    each); incomplete_shards: names of shards with files but no stats (not counted); bytes:
    total size of the complete shards' tars.
    """
    attempted = succeeded = bytes_total = shards = 0
    failed: Counter[str] = Counter()
    for outcome in outcomes:
        shards += 1
        attempted += int(outcome["attempted"])
        succeeded += int(outcome["succeeded"])
        bytes_total += int(outcome["bytes"])
        failed.update(outcome["failed"])
    dropped = (prefilter or {}).get("dropped", prefilter or {})
    return {
        "attempted": attempted,
        "succeeded": succeeded,
        "failed": {reason: failed[reason] for reason in REASONS if failed[reason]},
        "prefiltered": {reason: int(count) for reason, count in dropped.items() if count},
        "shards": shards,
        "incomplete_shards": sorted(incomplete),
        "bytes": bytes_total,
    }


def run_stats(run: RunDir, prefilter: dict[str, Any] | None = None) -> dict[str, Any]:
    """`aggregate` over every complete shard of the run, from their outcome records."""
    listing = list_shards(run)
    return aggregate(read_outcomes(run, listing).values(), prefilter, listing.incomplete)


__all__ = [
    "OUTCOME_SUFFIX",
    "REASONS",
    "SUCCESS",
    "ShardListing",
    "aggregate",
    "classify",
    "list_shards",
    "read_outcomes",
    "record_outcome",
    "run_stats",
    "shard_name",
    "shard_outcome",
    "shard_width",
]
