"""Ingest: a URL list -> raw webdataset shards with img2dataset over Ray, plus `ingest/stats.json`.

The URL list (parquet, CSV or JSONL on any fsspec URL) is cleaned first, into one parquet per
shard kept in the run (`ingest/urls/`): malformed and duplicate URLs, unusable captions and
pre-filtered rows are dropped and counted. For source='toy' the toy set is drawn into a
temporary folder and served on loopback HTTP, so the download path is the same one a LAION
run takes (only the toy host's address is put into the URLs as each shard is read).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ingest.download import accounting, distribute, url_list
from ingest.download.toy_server import serve_directory, write_toy_images
from ingest.download.url_list import prepare_url_list
from pipeline.core import layout, toy
from pipeline.core.config import IngestConfig, PipelineConfig
from pipeline.core.errors import StageFailure
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("ingest")
# The toy list names this host, so the cleaned list kept in the run stays valid when a resumed run
# serves the toy set on another loopback port; each download task puts the live address in its place.
TOY_BASE_URL = "http://toy.invalid"
# Kept in the run at a fixed path: the cleaned list's fingerprint names the URL list, so a resumed
# toy run finds its cleaned list again instead of cleaning anew.
TOY_URL_LIST = "ingest/toy-urls.parquet"


def _toy_url_list(config: PipelineConfig, workdir: Path, run: RunDir) -> str:
    """The toy set drawn into `workdir`, and its URL list under TOY_BASE_URL (see `distribute.rewrite_prefix`)."""
    ingest = config.ingest
    rows = write_toy_images(
        workdir / "images", ingest.toy_count, ingest.toy_image_size, config.seed, ingest.toy_colours, ingest.toy_aspect_ratios
    )
    rows["url"] = TOY_BASE_URL + "/" + rows.pop("file")
    run.write_bytes(TOY_URL_LIST, rows[["url", "caption", *toy.SPEC_COLUMNS]].to_parquet(index=False))
    return run.path(TOY_URL_LIST)


def refuse_foreign_shards(settings: IngestConfig, run: RunDir) -> None:
    """Raise if raw shards exist that were not cut from this cleaning of the URL list (an older
    version's split, or other settings'): resuming would skip shard ids that now hold other rows."""
    index = run.read_json(url_list.INDEX) if run.exists(url_list.INDEX) else {}
    # Any shard img2dataset finished counts, recorded or not: an older version wrote no outcome records.
    if index.get("fingerprint") == url_list.fingerprint(settings) or not accounting.list_shards(run).complete:
        return
    raise StageFailure(
        f"{run.path(layout.INGEST_SHARDS)} holds shards downloaded from another split of the URL list "
        f"({'an older version' if not index else 'other ingest settings'} cut it): their shard ids do not match "
        "this list's. Resume with the settings and version that started them, or rerun the stage with --force"
    )


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    settings = config.ingest
    started = time.monotonic()
    url_rewrite = None
    with ExitStack() as stack:
        if settings.source == "toy":
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
            source = _toy_url_list(config, workdir, run)
            url_rewrite = (TOY_BASE_URL, stack.enter_context(serve_directory(workdir / "images")))
            extra = list(dict.fromkeys([*settings.extra_columns, *toy.SPEC_COLUMNS]))  # what each image shows, for class labels
            settings = settings.model_copy(
                update={"url_list": source, "url_column": "url", "caption_column": "caption", "extra_columns": extra}
            )
        refuse_foreign_shards(settings, run)
        clean = prepare_url_list(settings, run)
        logger.info(
            f"url list: {clean.kept:,} of {clean.rows:,} rows kept in {len(clean.shards):,} shard(s); dropped {clean.dropped}"
        )
        downloaded = distribute.download(settings, clean, run, url_rewrite)
    stats = accounting.aggregate(downloaded.outcomes.values(), clean.prefilter(), downloaded.incomplete)
    stats["seconds"] = round(time.monotonic() - started, 2)
    stats["images_per_s"] = round(stats["succeeded"] / max(stats["seconds"], 1e-9), 2)
    stats["resumed_shards"] = downloaded.resumed_shards
    run.write_json(layout.INGEST_STATS, stats)
    if stats["succeeded"] == 0:
        raise StageFailure(f"ingest downloaded no image out of {stats['attempted']}: {json.dumps(stats['failed'])}")
    counts = {"attempted": stats["attempted"], "succeeded": stats["succeeded"], "shards": stats["shards"]}
    return {"counts": counts, "outputs": [layout.INGEST_SHARDS, layout.INGEST_STATS]}
