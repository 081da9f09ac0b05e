"""Clean an untrusted URL list (parquet, CSV or JSONL on any fsspec URL) into the parquet img2dataset reads.

`prepare_url_list(settings, output_path)` checks the columns first (a missing one fails fast,
named, before any row is read), then streams the list in batches and writes a parquet with
columns `url`, `caption` and `settings.extra_columns` (under their own names). Bad rows are
dropped and counted, never fatal. Each dropped row gets exactly one reason, the first that
applies in this order:

    malformed_row      a JSONL line that is not a JSON object, a CSV line pandas skipped
    malformed_url      not a string, not http(s), no host, whitespace or control characters,
                       longer than MAX_URL_CHARS, bytes that are not UTF-8, an unparsable port
    caption_not_utf8   caption bytes that are not valid UTF-8 (see below)
    caption_too_short  fewer than min_caption_chars characters after strip (None counts as "")
    caption_too_long   more than max_caption_chars characters after strip
    filtered:<column>  outside the ColumnFilter's [min, max]; non-numeric and NaN values too
    duplicate_url      the same URL (after strip) as an earlier row that was kept

Duplicates are checked last, so the first *usable* row of a URL is the one kept.

Non-UTF-8 captions: parquet string and binary columns are read as raw bytes and decoded
strictly (a parquet "string" column written by another tool may still hold invalid UTF-8);
CSV and JSONL are decoded with `surrogateescape`, so an invalid byte survives as a lone
surrogate and is detected when the caption is encoded back to UTF-8. A JSON `\\udcff`-style
escape (a lone surrogate) is caught the same way. Kept captions are stripped.

Extra columns keep their parquet types. CSV and JSONL carry no schema: each extra column's
type (int64, float64, bool for JSON, else string) is decided from the first batch; a later
value that does not fit it is written as null and counted under `nulled[column]` (the row
is kept). Strings that are not valid UTF-8 are written with U+FFFD in their place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import IngestConfig

MAX_URL_CHARS = 2048
BATCH_ROWS = 65_536

MALFORMED_ROW = "malformed_row"
MALFORMED_URL = "malformed_url"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE_URL = "duplicate_url"
FILTERED_PREFIX = "filtered:"

# Columns img2dataset writes itself; a pass-through column of the same name is refused.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


# ------------------------------------------------------------------------------------ rows
def clean_url(value: Any) -> str | None:
    """The stripped URL, or None when it is not a usable http(s) URL."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None  # None, NaN, numbers
    url = value.strip()
    # isprintable() is False for control characters, tabs/newlines, lone surrogates (bytes
    # that were not UTF-8) and invisible format characters; spaces are checked separately.
    if not url or len(url) > MAX_URL_CHARS or " " in url or not url.isprintable():
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return url


def clean_caption(value: Any, min_chars: int, max_chars: int) -> tuple[str | None, str | None]:
    """(stripped caption, None) or (None, reason)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = ""
    elif isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, CAPTION_NOT_UTF8
    elif isinstance(value, str):
        text = value
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: undecodable bytes or escapes
                return None, CAPTION_NOT_UTF8
    else:
        text = str(value)
    text = text.strip()
    if len(text) < min_chars:
        return None, CAPTION_TOO_SHORT
    if len(text) > max_chars:
        return None, CAPTION_TOO_LONG
    return text, None


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _numeric(values: pa.Array | list) -> np.ndarray:
    """float64 values of a filter column; anything non-numeric is NaN."""
    if isinstance(values, pa.Array):
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_decimal(values.type):
            return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        values = values.to_pylist()
    return np.fromiter((_to_float(value) for value in values), dtype=np.float64, count=len(values))


class _SeenDigests:
    """Set of 8-byte URL digests, for duplicate detection across batches.

    Streaming still needs every URL seen so far; storing a 64-bit blake2b digest per URL in
    sorted numpy runs costs 8 bytes a URL (100M URLs: 800 MB) instead of the URL itself. Runs
    are merged like a binary counter, so inserts stay O(N log N) overall and a lookup is a
    binary search per run. A digest collision (about n^2 / 2^65: ~3e-4 for 100M URLs) would
    drop one good URL as a duplicate, which is acceptable.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    @staticmethod
    def digests(urls: list[str]) -> np.ndarray:
        joined = b"".join(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest() for url in urls)
        return np.frombuffer(joined, dtype=np.uint64)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self.runs:
            index = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[index] == digests
        return found

    def add(self, digests: np.ndarray) -> None:
        """Add digests that are unique and not yet present."""
        if not len(digests):
            return
        self.runs.append(np.sort(digests))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]), kind="stable")

    def first_unseen(self, urls: list[str]) -> np.ndarray:
        """Mask of the URLs that are neither seen before nor repeated earlier in `urls`; adds them."""
        digests = self.digests(urls)
        keep = np.zeros(len(urls), dtype=bool)
        _, first = np.unique(digests, return_index=True)  # index of each digest's first occurrence
        keep[first] = True
        keep &= ~self.contains(digests)
        self.add(digests[keep])
        return keep


# ------------------------------------------------------------- extra columns of CSV/JSONL
def _is_null(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _parses(value: Any, kind: type) -> bool:
    try:
        kind(value)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


def _safe_text(value: str) -> str:
    """`value` as valid UTF-8 text: undecodable bytes (lone surrogates) become U+FFFD or '?'."""
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")  # CSV/JSONL bytes that were not UTF-8
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")  # other lone surrogates, e.g. from JSON escapes
    return raw.decode("utf-8", "replace")


class _ExtraColumn:
    """A pass-through column of a CSV or JSONL list: its type is fixed by the first batch."""

    def __init__(self, name: str, from_text: bool):
        self.name, self.from_text = name, from_text
        self.type: pa.DataType | None = None

    def infer(self, values: list) -> pa.DataType:
        present = [value for value in values if not _is_null(value)]
        if self.from_text:  # CSV: every value is a string
            if present and all(_parses(value, int) for value in present):
                return pa.int64()
            if present and all(_parses(value, float) for value in present):
                return pa.float64()
            return pa.string()
        if present and all(isinstance(value, bool) for value in present):
            return pa.bool_()
        if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
            return pa.int64()
        if present and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present):
            return pa.float64()
        return pa.string()

    def _convert(self, value: Any) -> tuple[Any, bool]:
        """(converted value, fitted); unfit values become None."""
        if _is_null(value):
            return (math.nan if pa.types.is_floating(self.type) and isinstance(value, float) else None), True
        if pa.types.is_string(self.type):
            if isinstance(value, str):
                return _safe_text(value), True
            return (json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)), True
        if pa.types.is_boolean(self.type):
            return (value, True) if isinstance(value, bool) else (None, False)
        if isinstance(value, bool):
            return None, False
        if pa.types.is_integer(self.type):
            if isinstance(value, int):
                return value, True
            if isinstance(value, float) and value.is_integer():
                return int(value), True
            if isinstance(value, str):
                try:
                    return int(value), True
                except ValueError:
                    pass
            return None, False
        number = _to_float(value)  # float64
        return (number, True) if not math.isnan(number) or value in ("nan", "NaN") else (None, False)

    def array(self, values: list) -> tuple[pa.Array, int]:
        if self.type is None:
            self.type = self.infer(values)
        converted, unfit = [], 0
        for value in values:
            out, fitted = self._convert(value)
            converted.append(out)
            unfit += not fitted
        try:
            return pa.array(converted, type=self.type, from_pandas=True), unfit
        except (pa.ArrowInvalid, OverflowError):  # e.g. an integer beyond int64
            fixed = [value if not isinstance(value, int) or -(2**63) <= value < 2**63 else None for value in converted]
            overflow = sum(a is not None and b is None for a, b in zip(converted, fixed))
            return pa.array(fixed, type=self.type, from_pandas=True), unfit + overflow


# ---------------------------------------------------------------------------- reading
def _files(url_list: str, declared: str = "auto") -> tuple[Any, list[str]]:
    """The filesystem and the files of `url_list` (a file, or a folder of parts read in name order)."""
    fs, path = fsspec.core.url_to_fs(url_list)
    if fs.isdir(path):
        files = sorted(
            entry
            for entry in fs.ls(path, detail=False)
            if not entry.rstrip("/").rsplit("/", 1)[-1].startswith(("_", "."))
            and _format_of(entry, "auto", required=False) in ((declared,) if declared != "auto" else ("parquet", "csv", "jsonl"))
        )
        if not files:
            raise ValueError(
                f"{url_list}: folder holds no {'.' + declared if declared != 'auto' else '.parquet, .csv or .jsonl'} file"
            )
        return fs, files
    if not fs.exists(path):
        raise ValueError(f"{url_list}: URL list not found")
    return fs, [path]


def _format_of(path: str, declared: str, required: bool = True) -> str | None:
    if declared != "auto":
        return declared
    name = path.rsplit("/", 1)[-1].lower()
    if fsspec.utils.infer_compression(name):
        name = name.rsplit(".", 1)[0]
    extension = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    found = _EXTENSIONS.get(extension)
    if found is None and required:
        raise ValueError(
            f"{path}: cannot tell the format from the extension {extension or '(none)'!r}; set ingest.url_list_format"
        )
    return found


def _open(fs: Any, path: str) -> Any:
    return fs.open(path, "rb", compression=fsspec.utils.infer_compression(path))


def _jsonl_objects(handle: Any, limit: int | None = None) -> Iterator[dict | None]:
    """One item per non-blank line: the JSON object, or None for a line that is not one."""
    for number, raw in enumerate(handle):
        if limit is not None and number >= limit:
            return
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):  # JSONDecodeError, absurdly deep nesting
            value = None
        yield value if isinstance(value, dict) else None


def _columns_of(fs: Any, path: str, fmt: str) -> list[str]:
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow.names
    with _open(fs, path) as handle:
        if fmt == "csv":
            import pandas as pd

            return [
                str(name) for name in pd.read_csv(handle, nrows=0, encoding="utf-8", encoding_errors="surrogateescape").columns
            ]
        head = handle.read(64).lstrip()
        if head.startswith(b"["):
            raise ValueError(f"{path}: a JSON array; ingest reads JSON Lines (one object per line)")
    with _open(fs, path) as handle:
        names: dict[str, None] = {}
        for value in _jsonl_objects(handle, limit=1000):
            names.update(dict.fromkeys(value or {}))
        return list(names)


def _batches(fs: Any, path: str, fmt: str, columns: list[str]) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(columns -> pa.Array or list, rows in the batch, malformed rows among them)."""
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                yield {name: batch.column(name) for name in columns}, batch.num_rows, 0
    elif fmt == "csv":
        import pandas as pd

        with _open(fs, path) as handle:
            reader = pd.read_csv(
                handle,
                chunksize=BATCH_ROWS,
                usecols=columns,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                encoding="utf-8",
                encoding_errors="surrogateescape",
                on_bad_lines="warn",
            )
            while True:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        frame = next(reader)
                    except StopIteration:
                        frame = None
                    except pd.errors.ParserError as error:
                        raise ValueError(f"{path}: not readable as CSV: {error}") from None
                skipped = sum(str(warning.message).count("Skipping line") for warning in caught)
                if frame is None:
                    if skipped:
                        yield {name: [] for name in columns}, skipped, skipped
                    return
                yield {name: frame[name].tolist() for name in columns}, len(frame) + skipped, skipped
    else:
        with _open(fs, path) as handle:
            objects = _jsonl_objects(handle)
            while True:
                chunk = [value for _, value in zip(range(BATCH_ROWS), objects)]
                if not chunk:
                    return
                valid = [value for value in chunk if value is not None]
                yield {name: [value.get(name) for value in valid] for name in columns}, len(chunk), len(chunk) - len(valid)


def _as_values(column: pa.Array | list) -> list:
    """Python values of a URL or caption column; strings arrive as bytes, decoded by the cleaners."""
    if isinstance(column, list):
        return column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())  # strict decoding happens per value: no batch-wide failure
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    elif pa.types.is_string_view(column.type):
        column = column.cast(pa.binary())
    return column.to_pylist()


# ---------------------------------------------------------------------------- public
def required_columns(settings: IngestConfig) -> dict[str, str]:
    """Every column the URL list must have -> the config key that asks for it."""
    needed = {settings.url_column: "ingest.url_column", settings.caption_column: "ingest.caption_column"}
    for name in settings.extra_columns:
        needed.setdefault(name, "ingest.extra_columns")
    for name in settings.filters:
        needed.setdefault(name, f"ingest.filters.{name}")
    return needed


def prepare_url_list(settings: IngestConfig, output_path: str) -> dict[str, Any]:
    """Clean `settings.url_list` into a parquet at `output_path` (a local path) for img2dataset.

    Returns {"rows": rows read, "kept": rows written, "dropped": {reason: count} (non-zero
    counts only, kept + sum(dropped) == rows), "nulled": {extra column: values written as
    null because they did not fit the column's type} (CSV/JSONL only; usually empty)}.
    Raises ValueError, before writing anything, for a missing column (named, with the file
    and the columns it has), an extra column img2dataset reserves, or an unknown format.
    """
    extras = _extra_columns(settings)
    needed = required_columns(settings)
    fs, files = _files(settings.url_list, settings.url_list_format)
    formats = {path: _format_of(path, settings.url_list_format) for path in files}
    _check_columns(fs, formats, needed)

    filters = [(name, bound.min, bound.max) for name, bound in settings.filters.items()]
    dropped: Counter[str] = Counter()
    seen = _SeenDigests()
    rows = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    temporary = f"{output_path}.tmp-{uuid.uuid4().hex[:8]}"
    out = _CleanListWriter(temporary, extras)
    try:
        for path in files:
            fmt = formats[path]
            file_schema = _parquet_schema(fs, path) if fmt == "parquet" else None
            for columns, n_rows, n_malformed in _batches(fs, path, fmt, list(needed)):
                rows += n_rows
                dropped[MALFORMED_ROW] += n_malformed
                index, urls, captions = _kept_rows(columns, settings, filters, seen, dropped)
                arrays = {
                    "url": pa.array([urls[i] for i in index], type=pa.string()),
                    "caption": pa.array([captions[i] for i in index], type=pa.string()),
                    **out.extra_arrays(columns, index, fmt),
                }
                out.write(arrays, path, file_schema)
        out.close()
        os.replace(temporary, output_path)
    finally:
        out.abort()
        if os.path.exists(temporary):
            os.remove(temporary)

    assert out.kept + sum(dropped.values()) == rows, (out.kept, dropped, rows)
    reasons = [MALFORMED_ROW, MALFORMED_URL, CAPTION_NOT_UTF8, CAPTION_TOO_SHORT, CAPTION_TOO_LONG]
    reasons += [FILTERED_PREFIX + name for name, _, _ in filters] + [DUPLICATE_URL]
    return {
        "rows": rows,
        "kept": out.kept,
        "dropped": {reason: dropped[reason] for reason in reasons if dropped[reason]},
        "nulled": {name: count for name, count in out.nulled.items() if count},
    }


def _extra_columns(settings: IngestConfig) -> list[str]:
    """`settings.extra_columns` without repeats; raises for an unset list or a column img2dataset writes itself."""
    if not settings.url_list:
        raise ValueError("ingest.url_list is not set")
    extras = list(dict.fromkeys(settings.extra_columns))
    reserved = [name for name in extras if name in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(
            f"ingest.extra_columns: {reserved} clash with the columns img2dataset writes itself "
            f"({sorted(RESERVED_COLUMNS)}); rename them in the URL list"
        )
    return extras


def _check_columns(fs: Any, formats: dict[str, str], needed: dict[str, str]) -> None:
    """Fail fast: every file's columns are checked before any row is read."""
    for path, fmt in formats.items():
        present = _columns_of(fs, path, fmt)
        missing = [name for name in needed if name not in present]
        if missing:
            named = ", ".join(f"{name!r} ({needed[name]})" for name in missing)
            raise ValueError(f"URL list {path}: missing column(s) {named}; it has {present}")


def _parquet_schema(fs: Any, path: str) -> pa.Schema:
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


def _kept_rows(
    columns: dict[str, Any],
    settings: IngestConfig,
    filters: list[tuple[str, Any, Any]],
    seen: _SeenDigests,
    dropped: Counter[str],
) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """(indexes of the batch's rows that pass every check, cleaned URLs, cleaned captions); counts the others in `dropped`.

    The checks run in the order the module docstring gives, so each dropped row has one reason.
    """
    urls = _as_values(columns[settings.url_column])
    captions = _as_values(columns[settings.caption_column])
    keep, out_urls, out_captions = _clean_rows(urls, captions, settings, dropped)
    for name, low, high in filters:
        keep = _drop_filtered(_numeric(columns[name]), low, high, keep, dropped, FILTERED_PREFIX + name)
    index = np.flatnonzero(keep)
    unique = seen.first_unseen([out_urls[i] for i in index])
    dropped[DUPLICATE_URL] += int((~unique).sum())
    return index[unique], out_urls, out_captions


def _clean_rows(
    urls: list, captions: list, settings: IngestConfig, dropped: Counter[str]
) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """(mask of rows with a usable URL and caption, cleaned URLs, cleaned captions); None where dropped."""
    n = len(urls)
    keep = np.zeros(n, dtype=bool)
    out_urls: list[str | None] = [None] * n
    out_captions: list[str | None] = [None] * n
    for i in range(n):
        url = clean_url(urls[i])
        if url is None:
            dropped[MALFORMED_URL] += 1
            continue
        caption, why = clean_caption(captions[i], settings.min_caption_chars, settings.max_caption_chars)
        if why is not None:
            dropped[why] += 1
            continue
        out_urls[i], out_captions[i], keep[i] = url, caption, True
    return keep, out_urls, out_captions


def _drop_filtered(
    values: np.ndarray, low: float | None, high: float | None, keep: np.ndarray, dropped: Counter[str], reason: str
) -> np.ndarray:
    """`keep` less the rows whose value is NaN or outside [low, high]; the kept ones among them count as `reason`."""
    inside = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        if low is not None:
            inside &= values >= low
        if high is not None:
            inside &= values <= high
    dropped[reason] += int((keep & ~inside).sum())
    return keep & inside


class _CleanListWriter:
    """The cleaned list's parquet (url, caption, extra columns); the first batch written fixes its schema."""

    def __init__(self, path: str, extras: list[str]):
        self.path, self.extras = path, extras
        self.text_columns: dict[str, _ExtraColumn] = {}  # CSV/JSONL extra columns, typed by their first batch
        self.nulled: Counter[str] = Counter()  # extra column -> values written as null (they did not fit its type)
        self.schema: pa.Schema | None = None
        self.writer: pq.ParquetWriter | None = None
        self.kept = 0

    def extra_arrays(self, columns: dict[str, Any], index: np.ndarray, fmt: str) -> dict[str, pa.Array]:
        """The extra columns' values at `index`: parquet ones as they are, CSV/JSONL ones typed and converted."""
        arrays = {}
        for name in self.extras:
            column = columns[name]
            if isinstance(column, list):
                extra = self.text_columns.setdefault(name, _ExtraColumn(name, from_text=fmt == "csv"))
                if extra.type is None:  # decided by the whole first batch, dropped rows included
                    extra.type = extra.infer(column)
                arrays[name], unfit = extra.array([column[i] for i in index])
                self.nulled[name] += unfit
            else:
                arrays[name] = column.take(pa.array(index, type=pa.int64()))
        return arrays

    def write(self, arrays: dict[str, pa.Array], path: str, file_schema: pa.Schema | None) -> None:
        """Append one batch's kept rows of `path`; `file_schema` (parquet files) types the extras of the first."""
        if self.schema is None:
            if file_schema is not None:
                fields = [file_schema.field(name) for name in self.extras]
            else:
                fields = [pa.field(name, arrays[name].type) for name in self.extras]
            self._open(fields)
        table = pa.table(arrays)
        if table.schema != self.schema:
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
                raise ValueError(f"{path}: extra columns do not match the first file's types {self.schema}: {error}") from None
        if table.num_rows:
            self.writer.write_table(table)
        self.kept += table.num_rows

    def _open(self, extra_fields: list[pa.Field]) -> None:
        self.schema = pa.schema([pa.field("url", pa.string()), pa.field("caption", pa.string()), *extra_fields])
        self.writer = pq.ParquetWriter(self.path, self.schema)

    def close(self) -> None:
        """Finish the file; with no row at all, an empty parquet with the right columns (extras as strings)."""
        if self.writer is None:
            self._open([pa.field(name, pa.string()) for name in self.extras])
        self.writer.close()
        self.writer = None

    def abort(self) -> None:
        """Close a file left open by an error (the caller removes it)."""
        if self.writer is not None:
            self.writer.close()
