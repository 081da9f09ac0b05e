"""Per-sample outcomes of img2dataset -> the counted reasons of `ingest/stats.json`.

img2dataset 1.47 writes, per shard, `NNNNN.tar`, `NNNNN.parquet` (one row per attempted
sample: `status` in {success, failed_to_download, failed_to_resize} and `error_message`)
and, last, `NNNNN_stats.json`. A shard without its stats file was killed mid-way: it is
listed as incomplete and none of its rows are counted.

A stats file proves nothing more: img2dataset counts a sample as a success before writing it,
swallows the error of that write (a full disk), and writes its stats file anyway (empty, when
the disk is full by then). So the download task checks its shard (`check_shard`: the stats file
parses, and the tar holds exactly as many samples as it counts) and only then reduces it to an
outcome (`shard_outcome`: attempted, succeeded, failed by reason, bytes) recorded as
`NNNNN_outcome.json`, written last: the shard's completion marker
(`pipeline.core.rundir.complete_shard_ids`). A shard that fails the check is removed
(`discard_shard`), so that a retry or a rerun downloads it again; a shard with a stats file but
no record (its task was killed in between, or an older version finished it) is checked by the
next run's task, and kept if whole. The driver only adds outcomes up (`aggregate`), so its work
is O(shards) with no per-sample or per-shard file reads, and a resumed run reads the small
records of the shards finished before it (`read_outcomes`).

`classify` maps one (status, error_message) to a reason. The messages it knows, as
img2dataset and the libraries under it write them (seen with urllib/http.client of
Python 3.11, OpenCV 4.14, Pillow 13):

    http_error        "HTTP Error 404: Not Found", "HTTP Error 302: The HTTP server returned a
                      redirect error that would lead to an infinite loop..."
    timeout           "timed out", "<urlopen error timed out>", "The read operation timed out",
                      "<urlopen error [Errno 110] Connection timed out>", the egress guard's request
                      deadline: "<urlopen error refused slow response: ...>"
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
    shard_failed      not a sample's own reason: every row of a shard whose task still failed after
                      its retries (killed for memory, crashed, raised); `failed_shard_outcome`
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir

SUCCESS = "success"
# Written by the download task after img2dataset's stats file, once the tar matches it: the shard's
# counts, so that the driver (and a resumed run) reads one small record per shard instead of its parquet.
OUTCOME_SUFFIX = layout.SHARD_OUTCOME_SUFFIX
# What a stats file must hold to count (img2dataset's logger.write_stats writes these and more).
STATS_FIELDS = ("count", "successes")
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
    "shard_failed",
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
    ("timeout", ("refused slow response", "timed out", "timeout")),
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


class ShardWriteError(RuntimeError):
    """A shard's files disagree: no readable stats file, an unreadable tar, or fewer (or more) samples in
    the tar than its stats file counts. A write of the shard failed; its files are not to be counted."""


@dataclass
class ShardListing:
    """What one listing of `ingest/shards` tells about each shard."""

    complete: dict[int, str]
    """Shard id -> name, for the shards whose stats file exists (img2dataset writes it last): complete
    once recorded too; until then the download task checks them (`verified_outcome`)."""
    incomplete: list[str]
    """Names of shards with a tar or parquet but no stats file: killed mid-way, never counted."""
    recorded: set[int]
    """Shards with a stats file and an outcome record: the complete ones (`rundir.complete_shard_ids`)."""


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


def _shard_file(name: str, suffix: str) -> str:
    return f"{layout.INGEST_SHARDS}/{name}{suffix}"


def read_stats(run: RunDir, name: str) -> dict[str, Any]:
    """A shard's stats file, if it parses and counts STATS_FIELDS as non-negative integers; else ShardWriteError."""
    try:
        stats = json.loads(run.read_bytes(_shard_file(name, layout.SHARD_STATS_SUFFIX)))
    except FileNotFoundError as error:
        raise ShardWriteError(f"shard {name}: no stats file") from error
    except ValueError as error:  # empty or cut short: its write failed
        raise ShardWriteError(f"shard {name}: write error: its stats file is not JSON ({error})") from error
    if not isinstance(stats, dict) or not all(
        isinstance(stats.get(field), int) and not isinstance(stats.get(field), bool) and stats[field] >= 0
        for field in STATS_FIELDS
    ):
        raise ShardWriteError(f"shard {name}: write error: its stats file lacks {' or '.join(STATS_FIELDS)}")
    return stats


def tar_samples(run: RunDir, name: str) -> int:
    """Samples (distinct keys, as webdataset groups members) in a shard's tar, read member header by
    header (the images are skipped, not read); ShardWriteError if the tar is missing or cut short."""
    keys: set[str] = set()
    try:
        with run.open_read(_shard_file(name, ".tar")) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    folder, _, base = member.name.rpartition("/")
                    keys.add(f"{folder}/{base.split('.', 1)[0]}")
    except FileNotFoundError as error:
        raise ShardWriteError(f"shard {name}: write error: no tar") from error
    except (tarfile.TarError, EOFError) as error:  # "unexpected end of data": cut short
        raise ShardWriteError(f"shard {name}: write error: its tar is unreadable ({error})") from error
    return len(keys)


def check_shard(run: RunDir, name: str) -> dict[str, Any]:
    """A shard's stats, if its files agree: the stats file parses (`read_stats`) and the tar holds
    exactly its `successes` samples (`tar_samples`). ShardWriteError otherwise."""
    stats = read_stats(run, name)
    samples = tar_samples(run, name)
    if samples != stats["successes"]:
        raise ShardWriteError(
            f"shard {name}: write error: its tar holds {samples} sample(s), its stats file counts {stats['successes']}"
        )
    return stats


def discard_shard(run: RunDir, name: str) -> None:
    """Remove a shard's files, its outcome record first, so that a retry or a rerun downloads it again."""
    for suffix in (OUTCOME_SUFFIX, layout.SHARD_STATS_SUFFIX, ".tar", ".parquet"):
        run.remove(_shard_file(name, suffix))


def raise_write_error(run: RunDir, name: str, error: OSError | None) -> None:
    """If writing the shard failed (`error`, from `shard_writer.take_error`), remove its files and raise
    the OSError, naming the tar: a full or read-only disk fails the stage with one line
    (`pipeline.runner.storage_error`), rather than counting one failed shard after another."""
    if error is None:
        return
    discard_shard(run, name)
    if error.filename is None:  # a write to an open file names none
        error.filename = run.path(_shard_file(name, ".tar"))
    raise error


def shard_outcome(run: RunDir, name: str) -> dict[str, Any]:
    """The outcome of one complete shard, from its own files (stats, parquet, tar size), once
    `check_shard` accepts them (ShardWriteError if not).

    {"shard": id, "attempted": samples sent to img2dataset (its stats' `count`), "succeeded":
    samples in the tar, "failed": {reason: count} (non-zero only, summing with succeeded to
    attempted), "bytes": size of the tar}. The download task computes it, so the driver never
    reads a shard's files.
    """
    stats = check_shard(run, name)
    reasons = _shard_reasons(run, name, stats)
    return {
        "shard": int(name),
        "attempted": int(stats.get("count", 0)),
        "succeeded": reasons[SUCCESS],
        "failed": {reason: reasons[reason] for reason in REASONS if reasons[reason]},
        "bytes": _size(run, f"{layout.INGEST_SHARDS}/{name}.tar"),
    }


def record_outcome(run: RunDir, name: str) -> dict[str, Any]:
    """`shard_outcome`, persisted next to the shard (after its stats file) so a resumed run reads only this.

    The record is the shard's completion marker, written last (atomically). A shard whose files
    disagree (ShardWriteError) is removed (`discard_shard`) and the error raised: never recorded.
    """
    try:
        outcome = shard_outcome(run, name)
    except ShardWriteError:
        discard_shard(run, name)
        raise
    run.write_json(outcome_path(name), outcome)
    return outcome


def verified_outcome(run: RunDir, name: str) -> dict[str, Any] | None:
    """The recorded outcome of a shard finished before this task (killed before its record, or by an
    older version that wrote none), if its stats file exists and its files agree; else None, with
    the disagreeing files removed: the shard is to be downloaded."""
    if not run.exists(_shard_file(name, layout.SHARD_STATS_SUFFIX)):
        return None
    try:
        return record_outcome(run, name)
    except ShardWriteError:
        return None


def failed_shard_outcome(shard_id: int, name: str, rows: int, error: str) -> dict[str, Any]:
    """The outcome of a shard whose task failed for good (`error`: why, e.g. 'out_of_memory'): its
    rows count as failed ('shard_failed'); never recorded in the run, so a rerun downloads it again."""
    failed = {"shard_failed": rows} if rows else {}
    return {
        "shard": shard_id,
        "attempted": rows,
        "succeeded": 0,
        "failed": failed,
        "bytes": 0,
        "shard_error": error,
        "name": name,
    }


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
    """Shard id -> outcome, for the run's shards with a stats file (or those of them in `shard_ids`).

    The outcome records are read in one concurrent call (`RunDir.read_many`); a shard without a
    readable record (finished by an older version, or killed between its stats file and its
    record) has its outcome computed from its files here, and recorded, if they agree; one whose
    files disagree is left out (and removed: `record_outcome`).
    """
    listing = listing or list_shards(run)
    wanted = listing.complete if shard_ids is None else {i: listing.complete[i] for i in shard_ids if i in listing.complete}
    recorded = {shard_id: outcome_path(name) for shard_id, name in wanted.items() if shard_id in listing.recorded}
    found = run.read_many(list(recorded.values()))
    outcomes: dict[int, dict[str, Any]] = {}
    for shard_id, name in wanted.items():
        data = found.get(recorded.get(shard_id, ""))
        outcome = _parse_outcome(data, shard_id) if data is not None else None
        if outcome is None:
            try:
                outcome = record_outcome(run, name)
            except ShardWriteError:
                continue
        outcomes[shard_id] = outcome
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
    total size of the complete shards' tars; and, only when some shard's task failed for good
    (`failed_shard_outcome`, not counted in shards), failed_shards: {name: why}.
    """
    attempted = succeeded = bytes_total = shards = 0
    failed: Counter[str] = Counter()
    failed_shards: dict[str, str] = {}
    for outcome in outcomes:
        if "shard_error" in outcome:
            failed_shards[outcome["name"]] = outcome["shard_error"]
        else:
            shards += 1
        attempted += int(outcome["attempted"])
        succeeded += int(outcome["succeeded"])
        bytes_total += int(outcome["bytes"])
        failed.update(outcome["failed"])
    dropped = (prefilter or {}).get("dropped", prefilter or {})
    stats = {
        "attempted": attempted,
        "succeeded": succeeded,
        "failed": {reason: failed[reason] for reason in REASONS if failed[reason]},
        "prefiltered": {reason: int(count) for reason, count in dropped.items() if count},
        "shards": shards,
        "incomplete_shards": sorted(incomplete),
        "bytes": bytes_total,
    }
    if failed_shards:
        stats["failed_shards"] = dict(sorted(failed_shards.items()))
    return stats


def run_stats(run: RunDir, prefilter: dict[str, Any] | None = None) -> dict[str, Any]:
    """`aggregate` over every complete shard of the run, from their outcome records."""
    listing = list_shards(run)
    return aggregate(read_outcomes(run, listing).values(), prefilter, listing.incomplete)


__all__ = [
    "OUTCOME_SUFFIX",
    "REASONS",
    "STATS_FIELDS",
    "SUCCESS",
    "ShardListing",
    "ShardWriteError",
    "aggregate",
    "check_shard",
    "classify",
    "discard_shard",
    "failed_shard_outcome",
    "list_shards",
    "raise_write_error",
    "read_outcomes",
    "read_stats",
    "record_outcome",
    "run_stats",
    "shard_name",
    "shard_outcome",
    "shard_width",
    "tar_samples",
    "verified_outcome",
]
