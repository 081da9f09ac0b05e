"""`pipeline bench ingest`: the ingest stage's download path against a plain img2dataset call.

Both download the same toy images from the same loopback server in the same process run:
the baseline is `img2dataset.download` with its multiprocessing distributor (one process,
same threads; its Ray distributor is measured too, for the choice between the two), the stage is URL-list cleaning plus one guarded Ray task per shard, first with
one task at a time, then two. Ratios, not seconds, are what compare across machines.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ingest.download import distribute
from ingest.download.toy_server import serve_directory, write_toy_images
from ingest.download.url_list import prepare_url_list
from pipeline.bench.common import Stopwatch, ratio, ray_session
from pipeline.core import layout
from pipeline.core.config import IngestConfig, RayConfig
from pipeline.core.rundir import RunDir


def _plain(url_list: str, output: str, settings: IngestConfig, distributor: str = "multiprocessing") -> float:
    from img2dataset import download

    with Stopwatch() as watch:
        download(
            url_list=url_list,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            output_folder=output,
            image_size=settings.image_size,
            resize_mode=settings.resize_mode,
            processes_count=1,
            thread_count=settings.threads,
            number_sample_per_shard=settings.samples_per_shard,
            timeout=int(settings.timeout_s),
            encode_format="jpg",
            encode_quality=95,
            distributor=distributor,
            extract_exif=False,
            enable_wandb=False,
        )
    return watch.seconds


def _stage(url_list: str, output: str, settings: IngestConfig, workdir: Path) -> float:
    with Stopwatch() as watch:
        run = RunDir(output)
        distribute.download(settings, prepare_url_list(settings, run), run)
    return watch.seconds


def _succeeded(output: str) -> int:
    run = RunDir(output)
    return sum(
        run.read_json(f"{layout.INGEST_SHARDS}/{name}").get("successes", 0)
        for name in run.list(layout.INGEST_SHARDS, suffix="_stats.json")
    )


def run_bench(images: int = 2000, cpus: int = 2, seed: int = 0) -> dict[str, Any]:
    with ray_session(RayConfig(num_cpus=cpus)), tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        workdir = Path(scratch)
        rows = write_toy_images(workdir / "images", images, 64, seed)
        with serve_directory(workdir / "images") as base_url:
            rows["url"] = base_url + "/" + rows.pop("file")
            url_list = str(workdir / "urls.parquet")
            rows[["url", "caption"]].to_parquet(url_list, index=False)
            base = IngestConfig(url_list=url_list, source="urls", allow_loopback=True, samples_per_shard=250, threads=16)

            plain_dir = str(workdir / "plain" / layout.INGEST_SHARDS)
            plain_seconds = _plain(url_list, plain_dir, base)
            plain_ok = _succeeded(str(workdir / "plain"))
            # img2dataset's own Ray distributor (one task per shard, no guard, no retries)
            ray_seconds = _plain(url_list, str(workdir / "ray" / layout.INGEST_SHARDS), base, distributor="ray")
            ray_ok = _succeeded(str(workdir / "ray"))
            one = base.model_copy(update={"cpus_per_task": float(cpus)})  # one shard task at a time
            one_seconds = _stage(url_list, str(workdir / "one"), one, workdir)
            two = base.model_copy(update={"cpus_per_task": cpus / 2})
            two_seconds = _stage(url_list, str(workdir / "two"), two, workdir)
            one_ok, two_ok = _succeeded(str(workdir / "one")), _succeeded(str(workdir / "two"))

    plain_rate, one_rate, two_rate = plain_ok / plain_seconds, one_ok / one_seconds, two_ok / two_seconds
    return {
        "bench": "ingest",
        "ratio": ratio(one_rate, plain_rate),
        "img_per_s": round(one_rate, 1),
        "plain_img_per_s": round(plain_rate, 1),
        "img2dataset_ray_distributor_img_per_s": round(ray_ok / ray_seconds, 1),
        "scaling_2_vs_1": ratio(two_rate, one_rate),
        "img_per_s_2_workers": round(two_rate, 1),
        "images": images,
        "succeeded": {"plain": plain_ok, "img2dataset_ray": ray_ok, "stage_1_worker": one_ok, "stage_2_workers": two_ok},
    }
