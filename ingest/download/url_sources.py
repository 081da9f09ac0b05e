"""Reading a URL list: the files of a folder, each file's format and columns, and its rows in batches.

A list is one file or a folder of parts, read in name order (names starting with `_` or `.`
skipped). The format is declared (`ingest.url_list_format`) or told by the extension, after a
compression suffix (`.gz` etc.): parquet, CSV or JSONL. `read_batches` yields BATCH_ROWS rows
at a time: parquet columns as pyarrow arrays, CSV and JSONL values as Python lists (decoded
with `surrogateescape`, so bytes that are not UTF-8 survive for the rules to catch), and the
malformed rows among them (a CSV line pandas skipped, a JSONL line that is not an object).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.credentials import redact

BATCH_ROWS = 65_536

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def list_files(url_list: str, declared: str = "auto") -> tuple[Any, list[str]]:
    """The filesystem and the files of `url_list` (a file, or a folder of parts read in name order)."""
    fs, path = fsspec.core.url_to_fs(url_list)
    if fs.isdir(path):
        files = sorted(
            entry
            for entry in fs.ls(path, detail=False)
            if not entry.rstrip("/").rsplit("/", 1)[-1].startswith(("_", "."))
            and format_of(entry, "auto", required=False) in ((declared,) if declared != "auto" else ("parquet", "csv", "jsonl"))
        )
        if not files:
            raise ValueError(
                f"{redact(url_list)}: folder holds no {'.' + declared if declared != 'auto' else '.parquet, .csv or .jsonl'} file"
            )
        return fs, files
    if not fs.exists(path):
        raise ValueError(f"{redact(url_list)}: URL list not found")
    return fs, [path]


def format_of(path: str, declared: str, required: bool = True) -> str | None:
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


def read_batches(
    fs: Any, path: str, fmt: str, columns: list[str], row_groups: tuple[int, ...] | None = None
) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(columns -> pa.Array or list, rows in the batch, malformed rows among them); of a parquet
    file, only `row_groups` when given."""
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            groups = list(row_groups) if row_groups is not None else None
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns):
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


def check_columns(fs: Any, formats: dict[str, str], needed: dict[str, str]) -> None:
    """Fail fast: every file's columns are checked before any row is read."""
    for path, fmt in formats.items():
        present = _columns_of(fs, path, fmt)
        missing = [name for name in needed if name not in present]
        if missing:
            named = ", ".join(f"{name!r} ({needed[name]})" for name in missing)
            raise ValueError(f"URL list {path}: missing column(s) {named}; it has {present}")


def parquet_schema(fs: Any, path: str) -> pa.Schema:
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)
