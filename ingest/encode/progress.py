"""Per-shard progress of the encode stage: what makes it resumable shard by shard.

Each raw shard STEM becomes exactly one latent shard, `encode/shards/STEM.tar`, written by one
encoder-actor call, which then writes the shard's one record `encode/progress/shards/STEM.json`:
samples read, images that would not decode, whether the tar was damaged, samples written (and
per bucket). The record is written after the tar is published, so a record means a complete
shard. `encode/progress/models.json` holds the encoders' identity records and the image
resolution, so that a resumed attempt never mixes latents of two VAEs or resolutions.

Each pass lists each folder once and reads the records concurrently: O(S) at S raw shards.
Runs made before one latent shard per raw shard (`encode/progress/parts/`, tars `STEM-xxxxxxxx.tar`)
are encoded again: their records are dropped and their tars removed as orphans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.core import layout
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("encode")

SHARDS = f"{layout.ENCODE_PROGRESS}/shards"
MODELS = f"{layout.ENCODE_PROGRESS}/models.json"
# Where runs before one latent shard per raw shard kept a record per written part.
LEGACY_PARTS = f"{layout.ENCODE_PROGRESS}/parts"


def stem(shard_name: str) -> str:
    """'00012.tar' -> '00012'."""
    return shard_name.rsplit("/", 1)[-1].removesuffix(".tar")


def shard_record_path(shard_stem: str) -> str:
    return f"{SHARDS}/{shard_stem}.json"


def latent_tar_path(shard_stem: str) -> str:
    """The one latent shard of raw shard `shard_stem`."""
    return f"{layout.ENCODE_SHARDS}/{shard_stem}.tar"


@dataclass
class ShardProgress:
    """What the run directory holds about one raw shard: its record, once it is complete."""

    stem: str
    record: dict[str, Any]

    @property
    def written(self) -> int:
        return int(self.record["written"])

    @property
    def complete(self) -> bool:
        return "written" in self.record  # records of older runs lack it: their samples went to parts


def read_progress(run: RunDir) -> dict[str, ShardProgress]:
    """Every raw shard with a record, by the record's file name (one listing, concurrent reads)."""
    paths = {f"{SHARDS}/{name}": stem(name.removesuffix(".json")) for name in run.list(SHARDS, ".json")}
    progress = {}
    for path, data in run.read_many(list(paths)).items():
        record = json.loads(data)
        # The stem comes from the listing, never from the record's content: a record cannot name
        # another file (e.g. "../../x") for `discard` to remove.
        record["shard"] = paths[path]
        progress[paths[path]] = ShardProgress(paths[path], record)
    return progress


def discard(run: RunDir, shard: ShardProgress) -> None:
    """Remove a shard's latent tar and then its record."""
    run.remove(latent_tar_path(shard.stem))
    run.remove(shard_record_path(shard.stem))


def remove_orphan_tars(run: RunDir, complete: set[str]) -> int:
    """Latent tars whose stem has no complete record (an attempt stopped before the record, or an older
    run's parts), and the temporary files of writes a killed process left: removed. One listing."""
    orphans = [
        name
        for name in run.list(layout.ENCODE_SHARDS)
        if (name.endswith(".tar") and stem(name) not in complete) or ".tar.tmp-" in name
    ]
    for name in orphans:
        run.remove(f"{layout.ENCODE_SHARDS}/{name}")
    return len(orphans)


def same_models(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Do two identity records agree wherever both say something? (Names come before hashes.)"""
    return all(stored.get(kind, {}).get(key, value) == value for kind, record in wanted.items() for key, value in record.items())


def prepare(
    run: RunDir, raw_stems: list[str], models: dict[str, Any], reusing: bool = False
) -> tuple[list[str], dict[str, int], dict[str, ShardProgress]]:
    """Clear what cannot be kept; return the stems still to encode, what was found, and the complete
    shards kept (by stem). Lists each folder once and reads each record once.

    `models` are identity records (`pipeline.core.identity`), by name only or with weight hashes, and
    the image resolution (kind "image"). Everything is dropped when they contradict the ones
    recorded with the progress (`confirm_models`). `reusing` (a new resolution reusing the text
    embeddings of the latent tars in place, `ingest.encode.reuse`): tars without a record are the
    previous ones, kept.
    """
    confirm_models(run, models, reusing)
    progress = read_progress(run)
    wanted = set(raw_stems)
    discarded = 0
    for shard in progress.values():
        if shard.stem not in wanted or not shard.complete:
            discarded += 1
            discard(run, shard)
    kept = {name: shard for name, shard in progress.items() if name in wanted and shard.complete}
    orphans = 0 if reusing else remove_orphan_tars(run, set(kept))
    todo = [name for name in raw_stems if name not in kept]
    found = {"kept_shards": len(kept), "discarded_partial_shards": discarded, "removed_orphan_tars": orphans}
    return todo, found, kept


def confirm_models(run: RunDir, models: dict[str, Any], reusing: bool = False) -> bool:
    """Record `models` with the progress; True if they agree with those recorded, else (or for an older
    version's progress) False, and all progress is dropped first (the latent tars too, unless `reusing`)."""
    stored = run.read_json(MODELS) if run.exists(MODELS) else {}
    legacy = run.exists(LEGACY_PARTS)
    if legacy:
        logger.warning(
            "encode: this run's latents were written by an older version (several parts per raw shard): "
            "encoding every raw shard again into one latent shard each"
        )
    agree = not legacy and same_models(stored, models)
    if not agree:
        if not reusing:
            run.remove(layout.ENCODE_SHARDS)
        run.remove(layout.ENCODE_PROGRESS)
        stored = {}
    run.write_json(MODELS, {kind: {**stored.get(kind, {}), **record} for kind, record in models.items()})
    return agree


def text_reused(progress: dict[str, ShardProgress]) -> int:
    """Samples of complete shards whose text members came from the previous latents (`ingest.encode.reuse`)."""
    return sum(shard.record.get("text_reused", 0) for shard in progress.values() if shard.complete)


def totals(progress: dict[str, ShardProgress]) -> dict[str, Any]:
    """Counts over complete shards, for the manifest."""
    records = [shard.record for shard in progress.values() if shard.complete]
    return {
        "samples": sum(record["written"] for record in records),
        "raw_samples": sum(record["samples"] for record in records),
        "skipped_undecodable": sum(record["undecodable"] for record in records),
        "skipped_unlabelled": sum(record.get("unlabelled", 0) for record in records),
        "truncated_shards": sorted(record["shard"] for record in records if record["truncated"]),
        "unreadable_shards": sorted(record["shard"] for record in records if record["unreadable"]),
        "raw_shards": len(records),
        "latent_shard_count": sum(1 for record in records if record["written"]),
    }
