"""img2dataset over Ray: one Ray task per shard, retried by Ray, resumable per shard.

The cleaned URL list is already split into one parquet per shard (`CleanList.shards`); each
task reads only its own, writes it as the Arrow file img2dataset's `Downloader` reads, and
the Downloader fetches, resizes and writes one webdataset shard plus `NNNNN_stats.json`. This
module replaces img2dataset's reader and distributor so that each task installs the egress
guard first (the guard must live in the process that downloads), has its own CPU share and
retries, and reduces its shard to an outcome (`accounting.shard_outcome`) that it records
and returns. A shard counts as complete once its outcome record exists, written only after its
tar was checked against its `_stats.json` (`accounting.check_shard`), so a rerun redoes only
missing, partial or broken shards. A shard whose task still fails after its retries (killed for
memory, its worker crashed, it raised) is counted as failed, by why (`shard_failure`), and the
other shards go on; a storage error (OSError) still fails the stage, as does every shard failing.

The driver stays O(shards) at 100,000 of them: at most a few tasks per CPU are in flight
(`pipeline.core.inflight.bounded`), each finished shard costs a dict update, and a resumed
run reads the small outcome records of the shards done before it in one concurrent call.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from ingest.download import accounting
from ingest.download.url_list import CleanList
from pipeline.core import faults, layout
from pipeline.core.config import IngestConfig
from pipeline.core.inflight import bounded
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir
from pipeline.core.shard_bar import ShardBar

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

logger = get_logger("ingest")
TASKS_PER_SLOT = 2  # one downloading, one queued: no slot waits on the driver


@dataclass
class Downloaded:
    """What `download` leaves: every complete shard's outcome, and how many an earlier run finished."""

    outcomes: dict[int, dict[str, Any]]
    """Shard id -> outcome (`accounting.shard_outcome`) of every complete shard of the list, and
    `accounting.failed_shard_outcome` of each whose task failed for good, in no set order."""
    resumed_shards: int
    """Shards complete before this run started (not downloaded again)."""
    incomplete: list[str]
    """Names of started but incomplete shards outside the list (stray files; never counted)."""


def rewrite_prefix(table: Any, url_rewrite: tuple[str, str] | None) -> Any:
    """`table` with URLs starting with url_rewrite[0] starting with url_rewrite[1] instead (the toy
    list names a placeholder host; the live server's port changes every run)."""
    if not url_rewrite:
        return table
    import pyarrow as pa
    import pyarrow.compute as pc

    old, new = url_rewrite
    urls = table.column("url")
    moved = pc.binary_join_element_wise(new, pc.utf8_slice_codeunits(urls, len(old)), "")
    rewritten = pc.if_else(pc.starts_with(urls, old), moved, urls)
    return table.set_column(table.schema.get_field_index("url"), pa.field("url", pa.string()), rewritten)


def _shard_task(
    run_url: str,
    shard_id: int,
    name: str,
    parquet: str | None,
    downloader: Any,
    guard: dict[str, Any],
    url_rewrite: tuple[str, str] | None,
) -> dict[str, Any]:
    """Download one shard (unless it is whole already, or `parquet` is None: only its outcome is computed) and return its outcome."""
    run = RunDir(run_url)
    kept = accounting.verified_outcome(run, name)  # finished before its record was written (killed, or an older version)
    if kept is not None:
        return kept
    if parquet is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ingest.download import egress, shard_writer

        egress.install(**guard)
        run.remove(accounting.outcome_path(name))  # an earlier try's record must not outlive its shard
        table = rewrite_prefix(pq.read_table(pa.BufferReader(run.read_bytes(parquet))), url_rewrite)
        table = table.select(downloader.column_list)
        with tempfile.TemporaryDirectory(prefix="ingest-shard-") as scratch:
            arrow_file = os.path.join(scratch, f"{name}.feather")
            with pa.OSFile(arrow_file, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            ok, _ = downloader((shard_id, arrow_file))
        accounting.raise_write_error(run, name, shard_writer.take_error(shard_id))  # a full disk: the OSError itself
        if not ok:  # img2dataset printed the traceback; raising lets Ray retry the shard
            raise RuntimeError(f"shard {name} failed")
        faults.inject("ingest-shard", shard=shard_id)  # its stats file is written, its outcome record not yet
    return accounting.record_outcome(run, name)  # checks the tar against the stats file; discards the shard if they disagree


def download(settings: IngestConfig, clean: CleanList, run: RunDir, url_rewrite: tuple[str, str] | None = None) -> Downloaded:
    """Download the shards of `clean` that are not complete yet into the run's raw shards."""
    import ray

    from ingest.download import egress

    width = accounting.shard_width(len(clean.shards))
    run.makedirs(layout.INGEST_SHARDS)  # img2dataset's writers open files in it (a local one is not made for them)
    listing = accounting.list_shards(run)
    wanted = range(len(clean.shards))
    done = [shard_id for shard_id in wanted if shard_id in listing.complete]
    outcomes = accounting.read_outcomes(run, listing, [i for i in done if i in listing.recorded])
    unrecorded = [shard_id for shard_id in done if shard_id not in outcomes]  # complete, from an older version
    todo = [shard_id for shard_id in wanted if shard_id not in listing.complete]
    logger.info(f"{len(clean.shards):,} shard(s): {len(done):,} already complete, {len(todo):,} to download")

    column_list = [*dict.fromkeys(settings.extra_columns), "caption", "url"]  # the order img2dataset's Reader used
    downloader = ray.put(_downloader(settings, run.path(layout.INGEST_SHARDS), column_list, width))
    guard = guard_settings(settings)
    task = ray.remote(_shard_task).options(
        num_cpus=settings.cpus_per_task,
        max_retries=settings.shard_retries,
        retry_exceptions=True,
        # Set before the worker imports cv2, which reads its pixel limit once.
        runtime_env={"env_vars": {**egress.env_for(**guard), **faults.environment()}},
    )

    def submit(shard_id: int) -> Any:
        # A shard with stats but no record keeps its files' names, whatever width wrote them, and is
        # downloaded again if they disagree (accounting.verified_outcome).
        name, parquet = listing.complete.get(shard_id) or accounting.shard_name(shard_id, width), clean.shards[shard_id][0]
        return task.remote(run.url, shard_id, name, parquet, downloader, guard, url_rewrite)

    errors: dict[str, BaseException] = {}

    def failed(shard_id: int, error: Exception) -> dict[str, Any]:
        if isinstance(error, OSError) or isinstance(getattr(error, "cause", None), OSError):
            raise error  # storage (a full disk, a lost bucket): every other shard would fail the same way
        name = listing.complete.get(shard_id) or accounting.shard_name(shard_id, width)
        errors[name] = error
        why = shard_failure(error)
        logger.warning(f"shard {name} failed for good ({why}), counted as failed: {_first_line(error)}")
        return accounting.failed_shard_outcome(shard_id, name, clean.shards[shard_id][1], why)

    with ShardBar(logger, "download", total=len(clean.shards), done=len(done)) as bar:
        for shard_id, outcome in bounded(submit, [*unrecorded, *todo], in_flight_limit(settings.cpus_per_task), on_error=failed):
            outcomes[shard_id] = outcome
            if shard_id not in listing.complete:  # the bar's rate counts this run's downloads only
                bar.update(outcome["succeeded"], outcome["failed"])
    lost = {outcome["name"]: outcome["shard_error"] for outcome in outcomes.values() if "shard_error" in outcome}
    if lost and len(lost) == len(outcomes):
        first = min(errors)
        raise RuntimeError(
            f"every shard of ingest failed: {_listed(lost)}; shard {first}'s error: {_first_line(errors[first])}"
        ) from errors[first]
    if lost:
        logger.warning(f"{len(lost):,} of {len(outcomes):,} shard(s) failed and are counted as failed: {_listed(lost)}")
    stray = [name for name in listing.incomplete if int(name) >= len(clean.shards)]  # the others were downloaded now
    return Downloaded(outcomes, resumed_shards=len(done), incomplete=stray)


def guard_settings(settings: IngestConfig) -> dict[str, Any]:
    """`egress.install`'s arguments for these settings. Loopback is open to the toy source, whose
    every URL points at our own loopback server; a URL list gets it only from allow_loopback."""
    mb = settings.max_response_mb
    return {
        "allow_loopback": settings.allow_loopback or settings.source == "toy",
        "allow_private": settings.allow_private_addresses,
        "max_megapixels": settings.max_megapixels,
        "max_response_bytes": None if mb is None else int(mb * 1e6),
        "request_deadline_s": settings.request_deadline_s,
    }


# Why a shard's task failed for good, by the class of the error ray.get raised (the first match wins).
SHARD_FAILURES = (
    ("out_of_memory", ("OutOfMemoryError",)),
    ("worker_died", ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError")),
    ("cancelled", ("TaskCancelledError",)),
    ("write_error", ("ShardWriteError",)),  # its tar and stats file disagreed on every try (accounting.check_shard)
    ("task_error", ("RayTaskError",)),
)


def shard_failure(error: BaseException) -> str:
    """'out_of_memory', 'worker_died', 'cancelled', 'task_error' (it raised, on every try) or 'error'."""
    names = {cls.__name__ for cls in type(error).__mro__}
    for why, classes in SHARD_FAILURES:
        if names.intersection(classes):
            return why
    return "error"


def _first_line(error: BaseException) -> str:
    """The last line of a task's error (Ray's text is the remote traceback), at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _listed(lost: dict[str, str], most: int = 20) -> str:
    """'00003 (out_of_memory), 00007 (task_error)': the first `most` names, then how many more."""
    shown = ", ".join(f"{name} ({why})" for name, why in sorted(lost.items())[:most])
    return shown + (f" and {len(lost) - most:,} more" if len(lost) > most else "")


def in_flight_limit(cpus_per_task: float) -> int:
    """Tasks in flight: TASKS_PER_SLOT per task slot of the CPUs Ray has free, at least 1."""
    import ray

    slots = int(ray.available_resources().get("CPU", 0) // cpus_per_task)
    return max(1, TASKS_PER_SLOT * slots)


def _downloader(settings: IngestConfig, output: str, column_list: list[str], width: int):
    """img2dataset's Downloader (and its Resizer) for one shard, as the settings ask."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    from ingest.download.shard_writer import CheckedSampleWriter

    resizer = Resizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=False,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_quality=95,
        encode_format="jpg",
        skip_reencode=False,
        disable_all_reencoding=False,
        min_image_size=settings.min_image_size,
        max_image_area=settings.max_megapixels * 1e6,
        max_aspect_ratio=float("inf"),
    )
    return Downloader(
        sample_writer_class=CheckedSampleWriter,  # keeps the write errors img2dataset swallows
        resizer=resizer,
        thread_count=settings.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=output,
        column_list=column_list,
        timeout=settings.timeout_s,
        number_sample_per_shard=settings.samples_per_shard,
        oom_shard_count=width,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=settings.retries,
        user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        blurring_bbox_col=None,
    )
