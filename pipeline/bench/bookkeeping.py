"""The driver's bookkeeping at S shards, for `pipeline bench scale-ingest`: it must grow linearly.

At 100,000 shards, whatever the driver does per shard is done 100,000 times, and anything it does
per shard *per shard* (a wait over every pending task, a listing per record) is 10^10 operations.
`driver_seconds` builds a synthetic run directory of S completed shards (ingest's stats and
outcome records, encode's records and latent tars, all tiny) and measures the driver's CPU
seconds (`time.process_time`, so other processes on a shared machine do not count) for:

- scheduling: S no-op Ray tasks through `pipeline.core.inflight.bounded` with the stages' limit
  and a `ShardBar` update per result, which is the loop the ingest and encode stages run;
- accounting: `ingest.download.accounting.run_stats` (one listing, the outcome records read
  concurrently, summed) — what a resumed ingest does with the shards finished before it;
- encode planning: `ingest.encode.progress.prepare` (one listing of each folder, the records read
  concurrently), then the counts and the manifest's per-shard entries.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ingest.download import accounting
from ingest.encode import progress as encode_progress
from ingest.encode import stage as encode
from pipeline.core import layout
from pipeline.core.config import EncodeConfig
from pipeline.core.inflight import bounded
from pipeline.core.rundir import RunDir
from pipeline.core.shard_bar import ShardBar

SAMPLES = 1000  # per synthetic shard: any number; no sample is ever read
IN_FLIGHT = 8  # what `distribute.in_flight_limit` gives a small node


def write_synthetic_run(root: Path, shards: int) -> RunDir:
    """A local run directory whose `shards` raw shards are downloaded and encoded (tiny files)."""
    ingest_dir, latent_dir = root / layout.INGEST_SHARDS, root / layout.ENCODE_SHARDS
    records = root / encode_progress.SHARDS
    for folder in (ingest_dir, latent_dir, records):
        folder.mkdir(parents=True, exist_ok=True)
    width = accounting.shard_width(shards)
    for shard in range(shards):
        name = accounting.shard_name(shard, width)
        failed = {"http_error": shard % 7, "timeout": shard % 3}
        succeeded = SAMPLES - sum(failed.values())
        (ingest_dir / f"{name}.tar").write_bytes(b"")
        (ingest_dir / f"{name}{layout.SHARD_STATS_SUFFIX}").write_text(json.dumps({"count": SAMPLES, "successes": succeeded}))
        outcome = {"shard": shard, "attempted": SAMPLES, "succeeded": succeeded, "failed": failed, "bytes": 1}
        (root / accounting.outcome_path(name)).write_text(json.dumps(outcome))
        record = {"shard": name, "samples": succeeded, "valid": succeeded, "written": succeeded, "undecodable": 0}
        record.update({"truncated": False, "unreadable": False, "error": None})
        (records / f"{name}.json").write_text(json.dumps(record))
        (latent_dir / f"{name}.tar").write_bytes(b"")
    return RunDir(str(root))


def _noop(shard: int) -> dict[str, Any]:
    return {"shard": shard, "succeeded": SAMPLES, "failed": {"timeout": 1}}


def driver_seconds(root: Path, shards: int) -> dict[str, float]:
    """CPU seconds of this process for each piece of bookkeeping over `shards` completed shards
    (the synthetic run under `root` is written on the first call, reused by the next)."""
    import ray

    run = RunDir(str(root)) if (root / layout.INGEST_SHARDS).exists() else write_synthetic_run(root, shards)
    seconds: dict[str, float] = {}
    task = ray.remote(_noop).options(num_cpus=0.01)
    ray.get([task.remote(shard) for shard in range(IN_FLIGHT)])  # workers started before the clock does
    quiet = logging.getLogger("bench.bookkeeping.quiet")
    quiet.disabled = True
    started = time.process_time()
    with ShardBar(quiet, "scheduling", total=shards, quiet=True) as bar:
        for _, outcome in bounded(task.remote, range(shards), IN_FLIGHT):
            bar.update(outcome["succeeded"], outcome["failed"])
    seconds["scheduling"] = time.process_time() - started

    started = time.process_time()
    stats = accounting.run_stats(run, {"dropped": {"malformed_url": 3}})
    seconds["accounting"] = time.process_time() - started
    assert stats["shards"] == shards and stats["attempted"] == shards * SAMPLES, stats

    started = time.process_time()
    stems = [accounting.shard_name(shard, accounting.shard_width(shards)) for shard in range(shards)]
    todo, found, state = encode_progress.prepare(run, stems, {"image": {"resolution": 64}})
    counts = encode_progress.totals(state)
    manifest = encode.encode_manifest({}, state, counts, EncodeConfig(), None, {})
    seconds["encode_planning"] = time.process_time() - started
    assert not todo and found["kept_shards"] == shards and len(manifest["latent_shards"]) == shards, found
    return {key: round(value, 3) for key, value in seconds.items()}
