"""Ingest: a URL list -> raw webdataset shards with img2dataset over Ray, plus `ingest/stats.json`.

The URL list (parquet, CSV or JSONL on any fsspec URL) is cleaned first: malformed and
duplicate URLs, unusable captions and pre-filtered rows are dropped and counted. For
source='toy' the toy set is drawn into a temporary folder and served on loopback HTTP, so
the download path is the same one a LAION run takes.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ingest.download import accounting, distribute
from ingest.download.toy_server import serve_directory, write_toy_images
from ingest.download.url_list import prepare_url_list
from pipeline.core import layout, toy
from pipeline.core.config import PipelineConfig
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("ingest")


def _toy_url_list(config: PipelineConfig, workdir: Path, base_url: str) -> str:
    ingest = config.ingest
    rows = write_toy_images(
        workdir / "images", ingest.toy_count, ingest.toy_image_size, config.seed, ingest.toy_colours, ingest.toy_aspect_ratios
    )
    rows["url"] = base_url + "/" + rows.pop("file")
    path = workdir / "toy-urls.parquet"
    rows[["url", "caption", *toy.SPEC_COLUMNS]].to_parquet(path, index=False)
    return str(path)


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    settings = config.ingest
    started = time.monotonic()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
        if settings.source == "toy":
            base_url = stack.enter_context(serve_directory(workdir / "images"))
            source = _toy_url_list(config, workdir, base_url)
            extra = list(dict.fromkeys([*settings.extra_columns, *toy.SPEC_COLUMNS]))  # what each image shows, for class labels
            settings = settings.model_copy(
                update={"url_list": source, "url_column": "url", "caption_column": "caption", "extra_columns": extra}
            )
        cleaned = str(workdir / "urls.parquet")
        prefilter = prepare_url_list(settings, cleaned)
        logger.info(f"url list: {prefilter['kept']} of {prefilter['rows']} rows kept; dropped {prefilter['dropped']}")
        resumed = distribute.download(settings, cleaned, run, settings.extra_columns)
    stats = accounting.aggregate(run, prefilter)
    stats["seconds"] = round(time.monotonic() - started, 2)
    stats["images_per_s"] = round(stats["succeeded"] / max(stats["seconds"], 1e-9), 2)
    stats.update(resumed)
    run.write_json(layout.INGEST_STATS, stats)
    if stats["succeeded"] == 0:
        raise RuntimeError(f"ingest downloaded no image out of {stats['attempted']}: {json.dumps(stats['failed'])}")
    counts = {"attempted": stats["attempted"], "succeeded": stats["succeeded"], "shards": stats["shards"]}
    return {"counts": counts, "outputs": [layout.INGEST_SHARDS, layout.INGEST_STATS]}
