"""Class labels for class-conditional training: a field of each sample's metadata JSON, mapped to an index.

`encode.class_field` names the field; the class names are `encode.classes` in that order, or else
the distinct values found in the raw shards, sorted (numbers numerically: 2 before 10). Index i is
classes[i]; training adds one more, len(classes), the null class that guidance uses as its
unconditional branch. A sample whose value is missing or not a listed class is skipped and counted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir


def class_value(meta: Any, field: str) -> str | None:
    """The sample's class as a string ('3' for 3), or None if its metadata has no usable value."""
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta) if meta else {}
        except ValueError:
            return None
    if not isinstance(meta, dict):
        return None
    value = meta.get(field)
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def label_of(meta: Any, field: str, classes: list[str]) -> int | None:
    """Index of the sample's class in `classes`, or None (skip it)."""
    value = class_value(meta, field)
    try:
        return classes.index(value) if value is not None else None
    except ValueError:
        return None


def sorted_classes(values) -> list[str]:
    """Distinct values, numbers first in numeric order, then the rest alphabetically."""

    def key(value: str):
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)

    return sorted(set(values), key=key)


def shard_class_values(run: RunDir, name: str, field: str) -> set[str]:
    from ingest.encode.shard_io import read_raw_samples

    values = set()
    # A damaged shard: the samples before the damage count (encode counts the damage).
    with contextlib.suppress(Exception), run.open_read(f"{layout.INGEST_SHARDS}/{name}") as handle:
        for sample in read_raw_samples(handle):
            value = class_value(sample.get(layout.META_KEY), field)
            if value is not None:
                values.add(value)
    return values


def find_classes(run: RunDir, raw_shards: list[str], field: str) -> list[str]:
    """The sorted distinct `field` values of every raw shard's samples (one pass over the shards)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda name: shard_class_values(run, name, field), raw_shards)
        return sorted_classes(set().union(*found))
