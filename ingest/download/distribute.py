"""img2dataset over Ray: one Ray task per shard, retried by Ray, resumable per shard.

img2dataset's own pieces do the work (its `Reader` splits the URL list into shard files, its
`Downloader` fetches, resizes and writes one webdataset shard plus `NNNNN_stats.json`); this
module replaces its distributor so that each task installs the egress guard first (the
guard must live in the process that downloads), has its own CPU share and retries, and the
driver can show a progress bar. A shard counts as complete once its `_stats.json` exists
(written after the tar), so a rerun redoes only missing or partial shards.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline.core import layout, log
from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir, complete_shard_ids

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _download_shard(downloader, task: tuple[int, str], guard: dict[str, Any]) -> int:
    from ingest.download import egress

    egress.install(**guard)
    ok, _ = downloader(task)
    if not ok:  # img2dataset printed the traceback; raising lets Ray retry the shard
        raise RuntimeError(f"shard {task[0]} failed")
    return task[0]


def download(settings: IngestConfig, url_list: str, run: RunDir, extra_columns: list[str]) -> dict[str, Any]:
    """Download `url_list` (a parquet with url, caption and `extra_columns`) into the run's raw shards."""
    import ray
    from img2dataset.reader import Reader

    from ingest.download import egress

    output = run.path(layout.INGEST_SHARDS)
    run.makedirs(f"{layout.INGEST_SHARDS}/_tmp")  # img2dataset's Reader writes its shard lists there
    done = complete_shard_ids(run)
    reader = Reader(
        url_list,
        "parquet",
        "url",
        "caption",
        None,
        None,
        extra_columns or None,
        settings.samples_per_shard,
        done,
        output + "/_tmp",
        0,
    )
    downloader = _downloader(settings, output, reader.column_list)
    guard = {
        "allow_loopback": settings.allow_loopback,
        "allow_private": settings.allow_private_addresses,
        "max_megapixels": settings.max_megapixels,
    }
    task = ray.remote(_download_shard).options(
        num_cpus=settings.cpus_per_task,
        max_retries=settings.shard_retries,
        retry_exceptions=True,
        # Set before the worker imports cv2, which reads its pixel limit once.
        runtime_env={"env_vars": egress.env_for(**guard)},
    )
    with log.prints_to_log_file():  # img2dataset's Reader narrates its sharding
        pending = [task.remote(downloader, shard, guard) for shard in reader]
    _wait_with_progress(run, pending, len(done))
    run.remove(f"{layout.INGEST_SHARDS}/_tmp")
    return {"resumed_shards": len(done)}


def _downloader(settings: IngestConfig, output: str, column_list: list[str]):
    """img2dataset's Downloader (and its Resizer) for one shard, as the settings ask."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

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
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=settings.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=output,
        column_list=column_list,
        timeout=settings.timeout_s,
        number_sample_per_shard=settings.samples_per_shard,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=settings.retries,
        user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        blurring_bbox_col=None,
    )


def _wait_with_progress(run: RunDir, pending: list, resumed: int) -> None:
    """Wait for every shard task, with a progress bar of shards and the images per second they wrote."""
    import ray
    from tqdm import tqdm

    started, images = time.monotonic(), 0
    with tqdm(total=len(pending) + resumed, initial=resumed, desc="ingest shards", unit="shard") as bar:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            shard_id = ray.get(finished[0])
            stats = run.read_json(f"{layout.INGEST_SHARDS}/{shard_id:05d}{layout.SHARD_STATS_SUFFIX}")
            images += stats.get("successes", 0)
            bar.set_postfix(images_per_s=f"{images / max(time.monotonic() - started, 1e-9):.0f}")
            bar.update(1)
