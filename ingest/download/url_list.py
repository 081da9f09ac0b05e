"""Clean an untrusted URL list (parquet, CSV or JSONL on any fsspec URL) into the run's shard parquets, once.

`prepare_url_list(settings, run)` checks the columns first (a missing one fails fast, named,
before anything is written), then cleans the list as a distributed job and writes, under
`layout.INGEST_URLS` of the run, one parquet per raw shard to download (columns `url`,
`caption` and `settings.extra_columns` under their own names, at most samples_per_shard rows)
and `index.json` last (the counts, the shards in shard-id order and a fingerprint of the
settings that shape the list). A resume with the same settings reads index.json and cleans
nothing; the shard ids stay fixed, and each download task reads only its own parquet.

The driver holds no row and no URL: its memory stays flat whatever the list's size.
- Phase 1, one Ray task per part of the list (a CSV/JSONL file, or about TASK_ROWS rows of
  parquet row groups, so one huge file still splits): reads its rows in batches, applies every
  check but de-duplication, and writes its kept rows split by a hash of the URL into H
  partitions (scratch pieces in the run dir; H from the list's size: ~PARTITION_ROWS a partition).
- Phase 2, one Ray task per partition: reads its pieces in read order, keeps each URL's first
  row (exact strings), and cuts the kept rows into shard parquets. The driver sums the counts
  and numbers the shards in (partition, chunk) order.

The rules that decide each row's fate (the drop reasons and their order, the vectorised fast
path, non-UTF-8 captions, the extra columns' types) are in `url_rules`; reading the list's
files and formats is `url_sources`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.download.url_rules import (
    CAPTION_REASONS,
    DUPLICATE_URL,
    FILTERED_PREFIX,
    MALFORMED_ROW,
    MALFORMED_URL,
    ExtraColumn,
    clean_batch,
    extra_columns,
    required_columns,
)
from ingest.download.url_sources import check_columns, format_of, list_files, parquet_schema, read_batches
from pipeline.core import layout
from pipeline.core.config import IngestConfig
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("ingest")

# Phase 1: parquet row groups are grouped into tasks of about this many rows.
TASK_ROWS = 1_000_000
# Phase 2: partitions hold about this many rows (H = estimated rows / PARTITION_ROWS).
PARTITION_ROWS = 1_000_000
# CSV/JSONL row counts are guessed from their bytes: this many a row, times this for a compressed file.
TEXT_BYTES_PER_ROW = 150
COMPRESSION_GUESS = 4
# partition_of hashes a URL's length and its first and last HASH_BYTES bytes (a multiple of 8).
HASH_BYTES = 24
# A list of at most this many rows is cleaned in the driver: Ray's worker start-up would cost more.
INLINE_ROWS = 100_000
# CPUs a cleaning task reserves: it is short and mostly one thread.
TASK_CPUS = 0.5

INDEX = f"{layout.INGEST_URLS}/index.json"
SCRATCH = f"{layout.INGEST_URLS}/scratch"
# Bumped when the cleaning's output changes for the same settings: an older index is not reused.
INDEX_VERSION = 1


@dataclass(frozen=True)
class CleanList:
    """The cleaned URL list, as written into the run directory under `layout.INGEST_URLS`.

    Shard ids are positions in `shards`: fixed once `index.json` is written, so a resume never
    cleans again and each download task reads only its own parquet."""

    rows: int
    """Rows read from the URL list."""
    kept: int
    """Rows written to the shards' parquets (kept + sum(dropped) == rows)."""
    dropped: dict[str, int]
    """Reason -> rows dropped (non-zero only)."""
    nulled: dict[str, int]
    """Extra column -> values written as null because they did not fit its type (CSV/JSONL)."""
    shards: list[tuple[str, int]]
    """Per shard id: (run-relative path of its parquet, rows in it). Columns: url, caption, extras."""

    def prefilter(self) -> dict[str, Any]:
        """What `ingest/stats.json` reports of the cleaning: rows, kept, dropped, nulled."""
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped), "nulled": dict(self.nulled)}


# ------------------------------------------------------------------------ the distributed job
@dataclass(frozen=True)
class Part:
    """One phase-1 task's share of the list: a file, or a range of a parquet file's row groups."""

    task: int
    """Position in the list's read order: phase 2 reads the pieces in this order (first row kept)."""
    path: str
    """The file, as the URL list's filesystem names it."""
    fmt: str
    """parquet, csv or jsonl."""
    row_groups: tuple[int, ...] | None = None
    """Parquet: the row groups this task reads; None: the whole file."""


@dataclass(frozen=True)
class CleanPlan:
    """What every task of one cleaning shares; decided by the driver before any row is cleaned."""

    settings: IngestConfig
    run_url: str
    """The run directory's URL: scratch pieces and shard parquets are written under it."""
    extra_fields: tuple[pa.Field, ...]
    """The output's extra columns: the first file's parquet types, or those its first batch suggests."""
    text_types: dict[str, pa.DataType]
    """CSV/JSONL extra column -> the type its values are converted to (from the first text file's first batch)."""
    partitions: int
    """H: URL-hash partitions, each de-duplicated by one phase-2 task."""
    task_rows: int = TASK_ROWS
    """Kept rows a phase-1 task holds before writing them out (TASK_ROWS, as the driver saw it)."""
    rows_estimate: int = 0
    """Rows the list holds: exact for parquet, guessed from bytes for CSV/JSONL."""


def _piece(partition: int, task: int, flush: int) -> str:
    """A scratch piece: names sort in read order (task, then the task's flushes)."""
    return f"{SCRATCH}/{partition:05d}/{task:06d}-{flush:05d}.arrow"


def _shard_path(partition: int, chunk: int) -> str:
    return f"{layout.INGEST_URLS}/{partition:05d}-{chunk:05d}.parquet"


def _nulled_column(index: int) -> str:
    return f"__nulled_{index}"


def clean_part(plan: CleanPlan, part: Part) -> dict[str, Any]:
    """Phase 1: read one part of the list in batches, clean it (all but de-duplication) and write its
    kept rows, split by a hash of the URL, as scratch pieces, one per partition each time
    `plan.task_rows` kept rows are held (a CSV/JSONL part is a whole file). Returns {"rows", "dropped": Counter,
    "pieces": [(partition, run-relative piece)], "seconds": {read, clean, write}}."""
    settings, seconds = plan.settings, Counter()
    fs = fsspec.core.url_to_fs(settings.url_list)[0]
    extras = [field.name for field in plan.extra_fields]
    dropped: Counter[str] = Counter()
    rows, tables, pieces = 0, [], []
    batches = read_batches(fs, part.path, part.fmt, list(required_columns(settings)), part.row_groups)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        seconds["read"] += time.perf_counter() - started
        if batch is None or sum(table.num_rows for table in tables) >= plan.task_rows:
            started = time.perf_counter()
            pieces += _write_pieces(plan, part.task, len(pieces), tables)
            seconds["write"] += time.perf_counter() - started
            tables = []
        if batch is None:
            break
        started = time.perf_counter()
        columns, n_rows, n_malformed = batch
        rows += n_rows
        dropped[MALFORMED_ROW] += n_malformed
        index, urls, captions = clean_batch(columns, settings, dropped)
        kept = np.zeros(len(columns[settings.url_column]), dtype=bool)
        kept[index] = True
        kept = pa.array(kept)
        arrays = {"url": urls.filter(kept), "caption": captions.filter(kept)}
        for number, (name, field) in enumerate(zip(extras, plan.extra_fields)):
            arrays[name], unfit = _extra_array(plan, part, columns[name], index, kept, field)
            if plan.text_types:  # only CSV/JSONL values can be nulled
                arrays[_nulled_column(number)] = unfit
        tables.append(pa.table(arrays))
        seconds["clean"] += time.perf_counter() - started
    return {"rows": rows, "dropped": dropped, "pieces": pieces, "seconds": seconds}


def _extra_array(
    plan: CleanPlan, part: Part, column: pa.Array | list, index: np.ndarray, kept: pa.Array, field: pa.Field
) -> tuple[pa.Array, pa.Array]:
    """(the extra column's values at `index` (`kept`: the same as a mask), typed as `field`; a mask
    of the values written as null because they did not fit)."""
    if isinstance(column, list):
        extra = ExtraColumn(field.name, from_text=part.fmt == "csv")
        extra.type = plan.text_types[field.name]
        values, unfit = extra.array([column[i] for i in index])
    else:
        values, unfit = column.filter(kept), np.zeros(len(index), dtype=bool)
    if values.type != field.type:
        try:
            values = values.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
            raise ValueError(
                f"{part.path}: extra column {field.name!r} does not match the first file's type {field.type}: {error}"
            ) from None
    return values, pa.array(unfit, type=pa.bool_())


def _write_pieces(plan: CleanPlan, task: int, flush: int, tables: list[pa.Table]) -> list[tuple[int, str]]:
    """Write kept rows as one scratch piece per partition they hash to; [(partition, piece)]."""
    table = pa.concat_tables(tables) if tables else None
    if table is None or not table.num_rows:
        return []
    run = RunDir(plan.run_url)
    if plan.partitions == 1:
        _write_piece(run, _piece(0, task, flush), table)
        return [(0, _piece(0, task, flush))]
    partition = partition_of(table.column("url"), plan.partitions)
    order = np.argsort(partition, kind="stable")  # stable: each piece keeps the read order
    table = table.take(pa.array(order, type=pa.int64()))
    found, starts = np.unique(partition[order], return_index=True)
    ends = [*starts[1:], table.num_rows]
    written = []
    for number, start, end in zip(found.tolist(), starts.tolist(), ends):
        _write_piece(run, _piece(number, task, flush), table.slice(start, int(end) - start))
        written.append((number, _piece(number, task, flush)))
    return written


def _write_piece(run: RunDir, relative: str, table: pa.Table) -> None:
    """A scratch piece: an Arrow IPC file, several times faster to write and read than parquet;
    lz4-compressed where bytes cost more than CPU (an object store), not on a local disk."""
    target = run.path(relative)
    run.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    options = pa.ipc.IpcWriteOptions(compression=None if run.is_local else "lz4")
    with run.fs.open(target, "wb") as handle, pa.ipc.new_file(handle, table.schema, options=options) as writer:
        writer.write_table(table)


def _read_piece(run: RunDir, relative: str) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(run.read_bytes(relative))).read_all()


def _write_parquet(run: RunDir, relative: str, table: pa.Table) -> None:
    """Write without a temporary name: index.json, written last, is what says the files are whole.
    URLs and captions are (almost) all distinct: a dictionary for them is built only to be dropped."""
    target = run.path(relative)
    run.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with run.fs.open(target, "wb") as handle:
        pq.write_table(table, handle, use_dictionary=[name for name in table.column_names if name not in ("url", "caption")])


def dedup_partition(plan: CleanPlan, partition: int, pieces: list[str]) -> dict[str, Any]:
    """Phase 2: read one partition's `pieces` in read order (their names sorted), keep the first row
    of each URL, and write the kept rows as shard parquets of at most samples_per_shard rows.
    Returns {"duplicates", "nulled": Counter, "shards": [(path, rows)], "seconds": {read, dedup, write}}."""
    run, seconds = RunDir(plan.run_url), Counter()
    started = time.perf_counter()
    table = pa.concat_tables([_read_piece(run, piece) for piece in sorted(pieces)])
    seconds["read"] += time.perf_counter() - started
    started = time.perf_counter()
    first = first_occurrences(table.column("url"))
    duplicates = table.num_rows - int(first.sum())
    table = table.filter(pa.array(first))
    nulled: Counter[str] = Counter()
    if plan.text_types:
        for number, field in enumerate(plan.extra_fields):
            nulled[field.name] += int(pc.sum(table.column(_nulled_column(number))).as_py() or 0)
        table = table.drop_columns([_nulled_column(number) for number in range(len(plan.extra_fields))])
    seconds["dedup"] += time.perf_counter() - started
    started = time.perf_counter()
    size, shards = plan.settings.samples_per_shard, []
    for chunk, start in enumerate(range(0, table.num_rows, size)):
        piece = table.slice(start, size)
        _write_parquet(run, _shard_path(partition, chunk), piece)
        shards.append((_shard_path(partition, chunk), piece.num_rows))
    seconds["write"] += time.perf_counter() - started
    return {"duplicates": duplicates, "nulled": nulled, "shards": shards, "seconds": seconds}


def first_occurrences(urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Mask of each distinct URL's first row (exact strings, no digests).

    dictionary_encode numbers the distinct values in order of first appearance, so a row is a
    value's first exactly when its code exceeds every code before it."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    first = np.ones(len(urls), dtype=bool)
    if len(urls) > 1:
        codes = pc.dictionary_encode(urls).indices.to_numpy(zero_copy_only=False).astype(np.int64)
        first[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    return first


def partition_of(urls: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """A partition in [0, partitions) per URL, from its byte length, its first 24 bytes (scheme
    and host) and its last 24 (where URLs differ most). The same string always lands in the same
    partition, in any process (no hash seed); the bytes only spread the URLs evenly. A few
    vectorised passes: far cheaper than hashing every byte of every URL."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    raw = urls.view(pa.binary()) if pa.types.is_string(urls.type) else urls.cast(pa.binary())
    state = pc.fill_null(pc.binary_length(raw), 0).to_numpy(zero_copy_only=False).astype(np.uint64) * np.uint64(
        0x9E3779B97F4A7C15
    )
    with np.errstate(over="ignore"):
        for start, stop in ((0, HASH_BYTES), (-HASH_BYTES, None)):
            for word in _words(pc.binary_slice(raw, start, stop)).T:
                state = (state ^ word) * np.uint64(0xBF58476D1CE4E5B9)
                state ^= state >> np.uint64(31)
    return (state % np.uint64(partitions)).astype(np.int64)


def _words(values: pa.Array) -> np.ndarray:
    """Binary values of at most HASH_BYTES bytes, padded with spaces, as rows of uint64 words."""
    padded = pc.ascii_rpad(values.view(pa.string()), HASH_BYTES, " ").view(pa.binary())  # bytes: no UTF-8 check
    fixed = padded.cast(pa.binary(HASH_BYTES))
    words = np.frombuffer(fixed.buffers()[1], dtype=np.uint64).reshape(-1, HASH_BYTES // 8)
    return words[fixed.offset : fixed.offset + len(fixed)]


# ---------------------------------------------------------------------------- public
def fingerprint(settings: IngestConfig) -> str:
    """Hash of the settings that shape the cleaned list: the same one means the same shards."""
    shaping = {
        "version": INDEX_VERSION,
        **settings.model_dump(
            mode="json",
            include={
                "url_list",
                "url_list_format",
                "url_column",
                "caption_column",
                "extra_columns",
                "filters",
                "min_caption_chars",
                "max_caption_chars",
                "samples_per_shard",
            },
        ),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def prepare_url_list(settings: IngestConfig, run: RunDir) -> CleanList:
    """Clean `settings.url_list` into the run's shard parquets (`layout.INGEST_URLS`), once.

    With `index.json` there and made from the same settings (`fingerprint`), returns what it
    records, reading no row. Otherwise removes `ingest/urls`, cleans the list as Ray tasks (in
    this process when Ray is not initialised or a filesystem is memory://, which other
    processes cannot see) and writes index.json last. Raises ValueError, before writing
    anything, for a missing column (named, with the file and the columns it has), an extra
    column img2dataset reserves, or an unknown format.
    """
    wanted = fingerprint(settings)
    if run.exists(INDEX):
        index = run.read_json(INDEX)
        if index.get("fingerprint") == wanted:
            return _from_index(index)
    from tqdm import tqdm

    plan, parts = plan_cleaning(settings, run)
    run.remove(layout.INGEST_URLS)
    inline = _inline(settings, run, plan)
    logger.info(f"cleaning the URL list: {len(parts):,} part(s) into {plan.partitions:,} partition(s), once")
    dropped: Counter[str] = Counter()
    rows, by_partition = 0, {}
    with tqdm(total=len(parts), desc="clean", unit="part", dynamic_ncols=True) as bar:
        for _, result in _map(clean_part, plan, parts, inline):
            rows += result["rows"]
            dropped.update(result["dropped"])
            for partition, piece in result["pieces"]:
                by_partition.setdefault(partition, []).append(piece)
            bar.set_postfix(rows=f"{rows:,}", dropped=f"{sum(dropped.values()):,}", refresh=False)
            bar.update()
    nulled: Counter[str] = Counter()
    shards_of: dict[int, list] = {}
    with tqdm(total=len(by_partition), desc="de-duplicate", unit="partition", dynamic_ncols=True) as bar:
        for (partition, _), result in _map(dedup_partition, plan, sorted(by_partition.items()), inline):
            dropped[DUPLICATE_URL] += result["duplicates"]
            nulled.update(result["nulled"])
            shards_of[partition] = result["shards"]
            bar.set_postfix(duplicates=f"{dropped[DUPLICATE_URL]:,}", refresh=False)
            bar.update()
    shards = [shard for partition in sorted(shards_of) for shard in shards_of[partition]]
    kept = sum(count for _, count in shards)
    assert kept + sum(dropped.values()) == rows, (kept, dropped, rows)
    reasons = [MALFORMED_ROW, MALFORMED_URL, *CAPTION_REASONS]
    reasons += [FILTERED_PREFIX + name for name in settings.filters] + [DUPLICATE_URL]
    clean = CleanList(
        rows=rows,
        kept=kept,
        dropped={reason: dropped[reason] for reason in reasons if dropped[reason]},
        nulled={name: count for name, count in nulled.items() if count},
        shards=shards,
    )
    run.remove(SCRATCH)
    run.write_json(INDEX, {"fingerprint": wanted, **clean.prefilter(), "shards": [list(shard) for shard in shards]})
    return clean


_SHARD_PATH = re.compile(rf"{re.escape(layout.INGEST_URLS)}/\d{{5,}}-\d{{5,}}\.parquet")


def _from_index(index: dict[str, Any]) -> CleanList:
    for path, _ in index["shards"]:  # read back from a file anyone with the run's keys could write
        if not isinstance(path, str) or not _SHARD_PATH.fullmatch(path):
            raise ValueError(f"{INDEX} names {path!r}, not a cleaned list's part (ingest/urls/NNNNN-NNNNN.parquet): refused")
    return CleanList(
        rows=index["rows"],
        kept=index["kept"],
        dropped=index["dropped"],
        nulled=index["nulled"],
        shards=[(path, rows) for path, rows in index["shards"]],
    )


def plan_cleaning(settings: IngestConfig, run: RunDir) -> tuple[CleanPlan, list[Part]]:
    """Check the list's columns (fail fast), decide the extra columns' types and the partitions,
    and cut the list into parts. Reads only metadata and the first batch of a CSV/JSONL file."""
    extras = extra_columns(settings)
    needed = required_columns(settings)
    fs, files = list_files(settings.url_list, settings.url_list_format)
    formats = {path: format_of(path, settings.url_list_format) for path in files}
    check_columns(fs, formats, needed)
    text_types: dict[str, pa.DataType] = {}
    text_files = [path for path in files if formats[path] != "parquet"]
    if text_files and extras:
        first = next(read_batches(fs, text_files[0], formats[text_files[0]], list(needed)), None)
        columns = first[0] if first else {name: [] for name in extras}
        from_text = formats[text_files[0]] == "csv"
        text_types = {name: ExtraColumn(name, from_text).infer(columns[name]) for name in extras}
    if formats[files[0]] == "parquet":
        schema = parquet_schema(fs, files[0])
        extra_fields = tuple(pa.field(name, schema.field(name).type) for name in extras)
    else:
        extra_fields = tuple(pa.field(name, text_types[name]) for name in extras)

    parts: list[Part] = []
    estimated = 0
    for path in files:
        if formats[path] != "parquet":
            parts.append(Part(len(parts), path, formats[path]))
            compressed = fsspec.utils.infer_compression(path) is not None
            estimated += fs.size(path) * (COMPRESSION_GUESS if compressed else 1) // TEXT_BYTES_PER_ROW
            continue
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
        group, group_rows = [], 0
        for number in range(metadata.num_row_groups):
            group.append(number)
            group_rows += metadata.row_group(number).num_rows
            if group_rows >= TASK_ROWS:
                parts.append(Part(len(parts), path, "parquet", tuple(group)))
                group, group_rows = [], 0
        if group or not parts or parts[-1].path != path:
            parts.append(Part(len(parts), path, "parquet", tuple(group)))
        estimated += metadata.num_rows
    partitions = max(1, math.ceil(estimated / PARTITION_ROWS))
    return CleanPlan(settings, run.url, extra_fields, text_types, partitions, TASK_ROWS, estimated), parts


def _inline(settings: IngestConfig, run: RunDir, plan: CleanPlan) -> bool:
    """Run the tasks in this process: no Ray; a memory:// list or run other processes cannot see; or a
    list of at most INLINE_ROWS rows, which this process cleans faster than Ray starts workers (its
    memory is bounded by INLINE_ROWS, not by the list)."""
    import ray

    memory = [fs for fs in (fsspec.core.url_to_fs(settings.url_list)[0], run.fs) if "memory" in fs.protocol]
    return bool(memory) or not ray.is_initialized() or plan.rows_estimate <= INLINE_ROWS


def _map(function: Any, plan: CleanPlan, items: list, inline: bool) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(item, function(plan, item)) for each item (a tuple item is spread into arguments): Ray
    tasks of TASK_CPUS, at most 2 per CPU in flight, in completion order; in order when inline."""

    def arguments(item: Any) -> tuple:
        return item if isinstance(item, tuple) else (item,)

    if inline:
        for item in items:
            yield item, function(plan, *arguments(item))
        return
    import ray

    from pipeline.core.inflight import bounded

    remote = ray.remote(function).options(num_cpus=TASK_CPUS)
    shared = ray.put(plan)
    limit = max(1, int(2 * ray.cluster_resources().get("CPU", 1)))
    yield from bounded(lambda item: remote.remote(shared, *arguments(item)), items, limit)
