"""Per-shard progress of the encode stage: what makes it resumable shard by shard.

Three kinds of record live under `encode/progress/`:
- `shards/STEM.json`, written by the task that decoded raw shard STEM once it read it to the
  end: samples seen, images that would not decode, whether the tar was damaged;
- `parts/PART.json`, written by a write task right after it published the latent tar
  `encode/shards/PART.tar`: which raw shard its rows came from and how many;
- `models.json`: the encoders' identity records and the image resolution, so that a resumed
  attempt never mixes latents of two different VAEs or resolutions.
A raw shard is complete when its record exists and its parts add up to the images it
decoded. Whatever an interrupted attempt left of any other shard is removed before that
shard is encoded again, so no sample is ever written twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import layout
from pipeline.core.rundir import RunDir

SHARDS = f"{layout.ENCODE_PROGRESS}/shards"
PARTS = f"{layout.ENCODE_PROGRESS}/parts"
MODELS = f"{layout.ENCODE_PROGRESS}/models.json"


def stem(shard_name: str) -> str:
    """'00012.tar' -> '00012'."""
    return shard_name.rsplit("/", 1)[-1].removesuffix(".tar")


def shard_record_path(shard_stem: str) -> str:
    return f"{SHARDS}/{shard_stem}.json"


def part_paths(part: str) -> tuple[str, str]:
    """(latent tar, its record) of a written part."""
    return f"{layout.ENCODE_SHARDS}/{part}.tar", f"{PARTS}/{part}.json"


@dataclass
class ShardProgress:
    """What the run directory holds about one raw shard."""

    stem: str
    record: dict[str, Any] | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(part["samples"] for part in self.parts)

    @property
    def complete(self) -> bool:
        return self.record is not None and self.written == self.record["valid"]


def read_progress(run: RunDir) -> dict[str, ShardProgress]:
    """Every raw shard with a record or a part, by stem."""
    progress: dict[str, ShardProgress] = {}
    for data in run.read_many([f"{SHARDS}/{name}" for name in run.list(SHARDS, ".json")]).values():
        record = json.loads(data)
        progress.setdefault(record["shard"], ShardProgress(record["shard"])).record = record
    for data in run.read_many([f"{PARTS}/{name}" for name in run.list(PARTS, ".json")]).values():
        part = json.loads(data)
        progress.setdefault(part["shard"], ShardProgress(part["shard"])).parts.append(part)
    return progress


def discard(run: RunDir, shard: ShardProgress) -> None:
    """Remove everything an unfinished attempt wrote for this shard: parts first, record last."""
    for part in shard.parts:
        for path in part_paths(part["part"]):
            run.remove(path)
    run.remove(shard_record_path(shard.stem))


def remove_orphan_tars(run: RunDir, progress: dict[str, ShardProgress], keep: set[str] = frozenset()) -> int:
    """Latent tars without a part record (a write task stopped between the two), but those in `keep`: removed."""
    recorded = {part["part"] for shard in progress.values() for part in shard.parts}
    orphans = [
        name for name in run.list(layout.ENCODE_SHARDS, ".tar") if name.removesuffix(".tar") not in recorded and name not in keep
    ]
    for name in orphans:
        run.remove(f"{layout.ENCODE_SHARDS}/{name}")
    return len(orphans)


def same_models(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Do two identity records agree wherever both say something? (Names come before hashes.)"""
    return all(stored.get(kind, {}).get(key, value) == value for kind, record in wanted.items() for key, value in record.items())


def prepare(
    run: RunDir, raw_stems: list[str], models: dict[str, Any], keep: set[str] = frozenset()
) -> tuple[list[str], dict[str, int]]:
    """Clear what cannot be kept; return the stems still to encode and what was found.

    `models` are identity records (`pipeline.core.identity`), by name only or with weight hashes, and
    the image resolution (kind "image"). Everything is dropped when they contradict the ones
    recorded with the progress, but the latent tars named in `keep` (`ingest.encode.reuse`).
    """
    stored = run.read_json(MODELS) if run.exists(MODELS) else {}
    if not same_models(stored, models):
        if not keep:
            run.remove(layout.ENCODE_SHARDS)
        run.remove(layout.ENCODE_PROGRESS)  # with `keep`, the tars go below as orphans
        stored = {}
    run.write_json(MODELS, {kind: {**stored.get(kind, {}), **record} for kind, record in models.items()})
    progress = read_progress(run)
    wanted = set(raw_stems)
    discarded = 0
    for shard in progress.values():
        if shard.stem not in wanted or not shard.complete:
            discarded += bool(shard.record or shard.parts)
            discard(run, shard)
    orphans = remove_orphan_tars(run, progress, keep)
    kept = [name for name in raw_stems if name in progress and progress[name].complete]
    todo = [name for name in raw_stems if name not in set(kept)]
    return todo, {
        "kept_shards": len(kept),
        "discarded_partial_shards": discarded,
        "removed_orphan_tars": orphans,
    }


def text_reused(progress: dict[str, ShardProgress]) -> int:
    """Samples of complete shards whose text members came from the previous latents (`ingest.encode.reuse`)."""
    return sum(shard.record.get("text_reused", 0) for shard in progress.values() if shard.complete)


def totals(progress: dict[str, ShardProgress]) -> dict[str, Any]:
    """Counts over complete shards, for the manifest."""
    complete = [shard for shard in progress.values() if shard.complete]
    records = [shard.record for shard in complete]
    return {
        "samples": sum(shard.written for shard in complete),
        "raw_samples": sum(record["samples"] for record in records),
        "skipped_undecodable": sum(record["undecodable"] for record in records),
        "skipped_unlabelled": sum(record.get("unlabelled", 0) for record in records),
        "truncated_shards": sorted(shard.stem for shard in complete if shard.record["truncated"]),
        "unreadable_shards": sorted(shard.stem for shard in complete if shard.record["unreadable"]),
        "raw_shards": len(complete),
        "shards": sorted(f"{part['part']}.tar" for shard in complete for part in shard.parts),
    }
