"""The rules that decide a URL-list row's fate: kept (URL and caption stripped) or dropped, and why.

Bad rows are dropped and counted, never fatal. Each dropped row gets exactly one reason, the
first that applies in this order:

    malformed_row      a JSONL line that is not a JSON object, a CSV line pandas skipped
    malformed_url      not a string, not http(s), no host, whitespace or control characters,
                       longer than MAX_URL_CHARS, bytes that are not UTF-8, an unparsable port
    caption_not_utf8   caption bytes that are not valid UTF-8 (see below)
    caption_too_short  fewer than min_caption_chars characters after strip (None counts as "")
    caption_too_long   more than max_caption_chars characters after strip
    filtered:<column>  outside the ColumnFilter's [min, max]; non-numeric and NaN values too
    duplicate_url      the same URL (after strip) as an earlier row that was kept

Duplicates are checked last (by `url_list`'s phase 2), so the first *usable* row of a URL (in
file order, then row order) is the one kept.

Speed: the checks are vectorised (pyarrow.compute). An ASCII URL that FAST_URL accepts and an
ASCII caption are decided there (trimmed of exactly the ASCII whitespace str.strip() removes);
every other value goes through the per-row `clean_url` / `clean_caption`, so the results are
those of the per-row cleaners on every row.

Non-UTF-8 captions: parquet string and binary columns are read as raw bytes and decoded
strictly (a parquet "string" column written by another tool may still hold invalid UTF-8);
CSV and JSONL are decoded with `surrogateescape`, so an invalid byte survives as a lone
surrogate and is detected when the caption is encoded back to UTF-8. A JSON `\\udcff`-style
escape (a lone surrogate) is caught the same way. Kept captions are stripped.

Extra columns keep the first file's parquet types. CSV and JSONL carry no schema: each extra
column's type (int64, float64, bool for JSON, else string) is decided by the driver from the
first batch of the first CSV/JSONL file (`ExtraColumn`); a later value that does not fit it is
written as null and counted under `nulled[column]` (the row is kept). Strings that are not
valid UTF-8 are written with U+FFFD in their place.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import IngestConfig

MAX_URL_CHARS = 2048

# What str.strip() removes from ASCII text (str.isspace() of the 128 ASCII characters).
ASCII_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
# An http(s) URL that `clean_url` accepts as it is: ASCII, no whitespace or control character, a
# host without userinfo, port or brackets (urlsplit's special cases), anything printable after it.
FAST_URL = r"^[hH][tT][tT][pP][sS]?://[A-Za-z0-9._~%!$&'()*+,;=-]+(?:[/?#][!-~]*)?$"
# What str.strip() removes beyond ASCII (str.isspace() of the other code points).
UNICODE_WHITESPACE = (
    "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# A caption (ASCII whitespace trimmed) whose first and last characters are not whitespace, or "".
_NOT_SPACE = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in ASCII_WHITESPACE + UNICODE_WHITESPACE) + "]"
CAPTION_ENDS = f"(?s)^(?:{_NOT_SPACE}(?:.*{_NOT_SPACE})?)?$"

MALFORMED_ROW = "malformed_row"
MALFORMED_URL = "malformed_url"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE_URL = "duplicate_url"
FILTERED_PREFIX = "filtered:"
CAPTION_REASONS = (CAPTION_NOT_UTF8, CAPTION_TOO_SHORT, CAPTION_TOO_LONG)

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


class ExtraColumn:
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

    def array(self, values: list) -> tuple[pa.Array, np.ndarray]:
        """(the values converted to the column's type, a mask of those written as null because they did not fit)."""
        if self.type is None:
            self.type = self.infer(values)
        converted, unfit = [], np.zeros(len(values), dtype=bool)
        for number, value in enumerate(values):
            out, fitted = self._convert(value)
            converted.append(out)
            unfit[number] = not fitted
        try:
            return pa.array(converted, type=self.type, from_pandas=True), unfit
        except (pa.ArrowInvalid, OverflowError):  # e.g. an integer beyond int64
            fixed = [value if not isinstance(value, int) or -(2**63) <= value < 2**63 else None for value in converted]
            unfit |= np.fromiter((a is not None and b is None for a, b in zip(converted, fixed)), dtype=bool, count=len(fixed))
            return pa.array(fixed, type=self.type, from_pandas=True), unfit


# ------------------------------------------------------------------ the vectorised checks
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


def _text_view(column: pa.Array | list) -> pa.Array | None:
    """A URL or caption column as a pa.string array of its raw bytes, NOT validated as UTF-8 (only
    its ASCII values are trusted), or None when the values are not all strings or bytes."""
    if isinstance(column, list):  # CSV/JSONL: str values (lone surrogates for bad bytes), None, numbers
        try:
            return pa.array(column, type=pa.string())
        except (pa.ArrowException, UnicodeError, TypeError, ValueError):
            return None
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_large_string(column.type) or pa.types.is_string_view(column.type):
        column = column.view(pa.large_binary()) if pa.types.is_large_string(column.type) else column.cast(pa.binary())
    if pa.types.is_large_binary(column.type):
        column = column.cast(pa.binary())
    if pa.types.is_binary(column.type):
        return column.view(pa.string())
    if pa.types.is_string(column.type):
        return column
    return None


def _mask(values: pa.Array) -> np.ndarray:
    """A boolean array as numpy; null is False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _values_at(column: pa.Array | list, index: np.ndarray) -> list:
    """The Python values (strings as bytes) of `column` at `index`, for the per-row cleaners."""
    if isinstance(column, list):
        return [column[i] for i in index]
    return _as_values(column.take(pa.array(index, type=pa.int64())))


def _clean_urls(column: pa.Array | list) -> tuple[np.ndarray, pa.Array]:
    """(mask of usable URLs, the stripped URLs: a pa.string array, meaningful where usable).

    An ASCII value that FAST_URL accepts after trimming str.strip()'s ASCII whitespace is one
    that `clean_url` accepts unchanged but for that strip; every other value goes to `clean_url`."""
    n = len(column)
    text = _text_view(column)
    if text is None:
        fast, out = np.zeros(n, dtype=bool), pa.nulls(n, pa.string())
    else:
        out = pc.ascii_trim(text, ASCII_WHITESPACE)
        fast = (
            _mask(pc.string_is_ascii(text))
            & _mask(pc.match_substring_regex(out, FAST_URL))
            & _mask(pc.less_equal(pc.binary_length(out), MAX_URL_CHARS))
        )
    usable = fast.copy()
    slow = np.flatnonzero(~fast)
    if len(slow):
        cleaned = [clean_url(value) for value in _values_at(column, slow)]
        found = np.fromiter((url is not None for url in cleaned), dtype=bool, count=len(slow))
        usable[slow[found]] = True
        out = _replace(out, slow[found], [url for url in cleaned if url is not None])
    return usable, out


def _clean_captions(column: pa.Array | list, rows: np.ndarray, low: int, high: int) -> tuple[np.ndarray, pa.Array]:
    """(reason code per row: 0 kept, else 1 + an index into CAPTION_REASONS; the stripped captions).

    Only `rows` (a mask: those with a usable URL) are checked; the others get code 0. A caption
    is decided here when it is ASCII or null (""), or valid UTF-8 whose ends after trimming
    str.strip()'s ASCII whitespace are not whitespace (CAPTION_ENDS), so that the trim is exactly
    str.strip(); its length is counted in code points. Every other value goes to `clean_caption`."""
    n = len(column)
    text = _text_view(column)
    codes = np.zeros(n, dtype=np.int8)
    if text is None:
        return _slow_captions(column, np.flatnonzero(rows), codes, pa.nulls(n, pa.string()), low, high)
    out = pc.fill_null(pc.ascii_trim(text, ASCII_WHITESPACE), "")
    fast = _mask(pc.or_kleene(pc.string_is_ascii(text), pc.is_null(text)))
    length = pc.binary_length(out).to_numpy(zero_copy_only=False).astype(np.int64)  # a writable copy
    other = np.flatnonzero(~fast & rows)
    if len(other):
        try:  # binary -> string checks UTF-8 strictly (lone surrogates included)
            valid = out.take(pa.array(other)).view(pa.binary()).cast(pa.string())
        except pa.ArrowInvalid:  # some caption of the batch is not UTF-8: all of them go to clean_caption
            valid = None
        if valid is not None:
            decided = _mask(pc.match_substring_regex(valid, CAPTION_ENDS))
            fast[other[decided]] = True
            length[other[decided]] = pc.utf8_length(valid.filter(pa.array(decided))).to_numpy(zero_copy_only=False)
            other = other[~decided]
    codes[fast & rows & (length < low)] = CAPTION_REASONS.index(CAPTION_TOO_SHORT) + 1
    codes[fast & rows & (length > high)] = CAPTION_REASONS.index(CAPTION_TOO_LONG) + 1
    return _slow_captions(column, other, codes, out, low, high)


def _slow_captions(
    column: pa.Array | list, slow: np.ndarray, codes: np.ndarray, out: pa.Array, low: int, high: int
) -> tuple[np.ndarray, pa.Array]:
    """`clean_caption` on the rows at `slow`: their codes set, their stripped captions put into `out`."""
    if not len(slow):
        return codes, out
    found, texts = [], []
    for i, value in zip(slow, _values_at(column, slow)):
        caption, why = clean_caption(value, low, high)
        if why is None:
            found.append(i)
            texts.append(caption)
        else:
            codes[i] = CAPTION_REASONS.index(why) + 1
    return codes, _replace(out, np.array(found, dtype=np.int64), texts)


def _replace(values: pa.Array, index: np.ndarray, replacements: list[str]) -> pa.Array:
    """`values` with the strings at `index` (ascending) replaced."""
    if not len(index):
        return values
    mask = np.zeros(len(values), dtype=bool)
    mask[index] = True
    return pc.replace_with_mask(values, pa.array(mask), pa.array(replacements, type=pa.string()))


def clean_batch(columns: dict[str, Any], settings: IngestConfig, dropped: Counter[str]) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(indexes of the batch's rows that pass every check but de-duplication, stripped URLs,
    stripped captions); counts the other rows in `dropped`, each under the first reason that
    applies, in the module docstring's order. Same results as `clean_url` and `clean_caption`
    on every row, which only the rows the vectorised checks do not decide go through."""
    usable, urls = _clean_urls(columns[settings.url_column])
    codes, captions = _clean_captions(
        columns[settings.caption_column], usable, settings.min_caption_chars, settings.max_caption_chars
    )
    dropped[MALFORMED_URL] += int((~usable).sum())
    for code, reason in enumerate(CAPTION_REASONS, start=1):
        dropped[reason] += int((codes == code).sum())
    keep = usable & (codes == 0)
    for name, bound in settings.filters.items():
        keep = _drop_filtered(_numeric(columns[name]), bound.min, bound.max, keep, dropped, FILTERED_PREFIX + name)
    return np.flatnonzero(keep), urls, captions


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


# ------------------------------------------------------------------------ columns
def required_columns(settings: IngestConfig) -> dict[str, str]:
    """Every column the URL list must have -> the config key that asks for it."""
    needed = {settings.url_column: "ingest.url_column", settings.caption_column: "ingest.caption_column"}
    for name in settings.extra_columns:
        needed.setdefault(name, "ingest.extra_columns")
    for name in settings.filters:
        needed.setdefault(name, f"ingest.filters.{name}")
    return needed


def extra_columns(settings: IngestConfig) -> list[str]:
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
