"""Ingest: a URL list -> raw webdataset shards with img2dataset, plus `ingest/stats.json`.

For source='toy' the toy set is drawn into a temporary folder and served on loopback HTTP,
so the download path is the same one a LAION run takes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd

from ingest.toy_server import serve_directory, write_toy_images
from pipeline import layout
from pipeline.config import PipelineConfig
from pipeline.rundir import RunDir

URL_COLUMN = "url"
CAPTION_COLUMN = "caption"


def _toy_url_list(config: PipelineConfig, workdir: Path, base_url: str) -> Path:
    rows = write_toy_images(workdir / "images", config.ingest.toy_count, config.ingest.toy_image_size, config.seed)
    rows[URL_COLUMN] = base_url + "/" + rows.pop("file")
    path = workdir / "urls.parquet"
    rows[[URL_COLUMN, CAPTION_COLUMN]].to_parquet(path, index=False)
    return path


def download(config: PipelineConfig, url_list: str, url_column: str, caption_column: str, output: str) -> None:
    """Run img2dataset over `url_list` into webdataset shards at `output` (any fsspec URL)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download

    settings = config.ingest
    img2dataset_download(
        url_list=url_list,
        input_format="parquet",
        url_col=url_column,
        caption_col=caption_column,
        output_format="webdataset",
        output_folder=output,
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        processes_count=settings.processes,
        thread_count=settings.threads,
        number_sample_per_shard=settings.samples_per_shard,
        timeout=int(max(1, settings.timeout_s)),
        retries=settings.retries,
        encode_format="jpg",
        encode_quality=95,
        distributor="multiprocessing",
        incremental_mode="incremental",  # a rerun skips shards img2dataset already finished
        enable_wandb=False,
    )


def aggregate_stats(run: RunDir) -> dict[str, Any]:
    """Sum img2dataset's per-shard *_stats.json into attempted / succeeded / failed by reason."""
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    seconds = 0.0
    for name in run.list(layout.INGEST_SHARDS, suffix="_stats.json"):
        shard = run.read_json(f"{layout.INGEST_SHARDS}/{name}")
        totals["attempted"] += shard.get("count", 0)
        totals["succeeded"] += shard.get("successes", 0)
        totals["failed_to_download"] += shard.get("failed_to_download", 0)
        totals["failed_to_resize"] += shard.get("failed_to_resize", 0)
        seconds = max(seconds, shard.get("duration", 0.0))
        for message, count in (shard.get("status_dict") or {}).items():
            if message != "success":
                reasons[message] += count
    return {
        "attempted": totals["attempted"],
        "succeeded": totals["succeeded"],
        "failed": {
            "download": totals["failed_to_download"],
            "resize": totals["failed_to_resize"],
            "by_reason": dict(reasons.most_common()),
        },
        "shards": len(run.list(layout.INGEST_SHARDS, suffix=".tar")),
    }


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    settings = config.ingest
    started = time.monotonic()
    with ExitStack() as stack:
        if settings.source == "toy":
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="toy-")))
            base_url = stack.enter_context(serve_directory(workdir / "images"))
            url_list, url_column, caption_column = str(_toy_url_list(config, workdir, base_url)), URL_COLUMN, CAPTION_COLUMN
        else:
            url_list, url_column, caption_column = settings.url_list, settings.url_column, settings.caption_column
            _check_columns(url_list, [url_column, caption_column])
        download(config, url_list, url_column, caption_column, run.path(layout.INGEST_SHARDS))
    stats = aggregate_stats(run)
    stats["seconds"] = round(time.monotonic() - started, 2)
    stats["images_per_s"] = round(stats["succeeded"] / max(stats["seconds"], 1e-9), 2)
    run.write_json(layout.INGEST_STATS, stats)
    if stats["succeeded"] == 0:
        raise RuntimeError(f"ingest downloaded no image out of {stats['attempted']}: {json.dumps(stats['failed'])}")
    return {"counts": {k: stats[k] for k in ("attempted", "succeeded", "shards")}, "outputs": [layout.INGEST_SHARDS, layout.INGEST_STATS]}


def _check_columns(url_list: str, columns: list[str]) -> None:
    """Fail fast, naming the column, before img2dataset starts its processes."""
    import pyarrow.parquet as pq
    import fsspec

    with fsspec.open(url_list, "rb") as handle:
        present = pq.ParquetFile(handle).schema_arrow.names
    missing = [column for column in columns if column not in present]
    if missing:
        raise ValueError(f"{url_list}: missing column(s) {missing}; it has {present}")
