"""`pipeline bench encode`: the encode stage against a bare loop of the same models' forward passes.

Both sides encode the same decoded images of the same raw shards in the same process run. The
stage is `ingest.encode.stage.run_stage` as a run calls it (reading shards, decoding, the encoder
actor pool, writing latent shards, the manifest); the baseline decodes every image up front,
untimed, and times only `encode_batch` over batches of `encode.batch_size` with the intra-op
threads an encoder actor gets. That mirrors a GPU node, where one accelerator encodes while
other CPUs decode: a ratio near 1 means the stage keeps its encoder busy. Ratios, not seconds,
are what compare across machines. `ratio` takes the stage's rate from its first latent shard to
its last (the stream a dataset of any size sees); `wall_ratio` includes its start-up as well.

The stage should also stream: its peak memory (driver plus Ray worker processes, sampled) is
measured on half the shards too, and `memory_growth_2x` is the full run's peak over that one.

    pipeline bench encode --images 12000 --cpus 2
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ingest.encode import shard_io as encode_io
from ingest.encode import stage as encode
from pipeline.bench.common import SAMPLES_PER_SHARD, PeakMemory, Stopwatch, logger, ratio, ray_session, torch_threads
from pipeline.core import layout
from pipeline.core.config import PipelineConfig, load_config
from pipeline.core.rundir import RunDir, complete_shards

# Small benches cut shards smaller than SAMPLES_PER_SHARD, so that every run has several and the
# 2x run twice as many.
MIN_SHARDS = 4
# Enough work that the stage's fixed start-up (~10 s on 2 cores) weighs as it would on a real
# dataset, not as it does on a toy one: overhead_seconds reports it separately.
DEFAULT_IMAGES = 12000

log = logger("encode")


def _bench_config(images: int, samples_per_shard: int, cpus: int) -> PipelineConfig:
    """The tiny preset as a run uses it (its encode section unchanged), with `images` toy images."""
    overrides = [f"ingest.toy_count={images}", f"ingest.samples_per_shard={samples_per_shard}", f"ray.num_cpus={cpus}"]
    return load_config("tiny", overrides=overrides)


def _ingested_run(config: PipelineConfig, directory: Path) -> RunDir:
    """A run directory holding the raw shards of `config`'s toy images (untimed)."""
    from ingest.download.stage import run_stage as ingest

    run = RunDir(directory)
    ingest(config, run)
    return run


def _timed_stage(config: PipelineConfig, run: RunDir) -> tuple[int, float, float]:
    """(samples written, seconds, peak RSS in MB) of one encode stage run."""
    with PeakMemory() as memory, Stopwatch() as watch:
        summary = encode.run_stage(config, run)
    return int(summary["counts"]["samples"]), watch.seconds, memory.peak_bytes / 2**20


def _steady_rate(run: RunDir) -> tuple[float, float]:
    """(samples/s, seconds) of the stage's stream from its first latent shard to its last.

    The stage's start-up (actors importing and loading the models) is paid once per run, whatever
    its size; this is the rate a dataset of any real size sees. Shards' records are written as
    their latent shards are published, so their times mark the stream (local run only).
    """
    records = sorted(Path(run.path(layout.ENCODE_PROGRESS), "shards").glob("*.json"), key=lambda path: path.stat().st_mtime)
    if len(records) < 2:
        return 0.0, 0.0
    # An actor works on SHARDS_PER_ACTOR shards at once, so the first ones finish together: the
    # stream is timed from the last of them.
    first = min(len(records) - 1, encode.SHARDS_PER_ACTOR) - 1
    samples = sum(json.loads(path.read_text())["written"] for path in records[first + 1 :])
    seconds = records[-1].stat().st_mtime - records[first].stat().st_mtime
    return samples / max(seconds, 1e-9), seconds


def _decoded_batches(config: PipelineConfig, run: RunDir) -> list[tuple[torch.Tensor, list[str]]]:
    """Every image of the run's raw shards, read and decoded by the stage's own functions, in batches."""
    settings = config.encode
    images, captions = [], []
    for name in complete_shards(run):
        with run.open_read(f"{layout.INGEST_SHARDS}/{name}") as handle:
            for sample in encode_io.read_raw_samples(handle):
                pixels = encode_io.decode_sample(sample, settings.resolution)
                if pixels is not None and layout.CAPTION_KEY in sample:
                    images.append(pixels)
                    captions.append(sample[layout.CAPTION_KEY].decode("utf-8", errors="replace"))
    size = settings.batch_size
    return [
        (encode.to_model_input(np.stack(images[start : start + size])), captions[start : start + size])
        for start in range(0, len(images), size)
    ]


def _timed_bare_loop(config: PipelineConfig, batches: list[tuple[torch.Tensor, list[str]]]) -> tuple[float, int]:
    """(seconds, threads) of `encode_batch` over `batches` with an encoder actor's threads."""
    from pipeline.core.identity import Encoders
    from pipeline.core.models import vae_scaling_factor

    encoders = Encoders.load(config.encode)
    scaling_factor = vae_scaling_factor(encoders.vae)
    threads = max(1, int(config.encode.cpus_per_actor))
    with torch_threads(threads), Stopwatch() as watch:
        for pixels, captions in batches:
            encode.encode_batch(pixels, captions, encoders, scaling_factor, config.encode)
    return watch.seconds, threads


def run_bench(images: int = DEFAULT_IMAGES, cpus: int = 2) -> dict[str, Any]:
    samples_per_shard = max(1, min(SAMPLES_PER_SHARD, images // MIN_SHARDS))
    config, config_half = _bench_config(images, samples_per_shard, cpus), _bench_config(images // 2, samples_per_shard, cpus)
    with ray_session(config.ray), tempfile.TemporaryDirectory(prefix="bench-encode-") as scratch:
        run, run_half = _ingested_run(config, Path(scratch) / "run"), _ingested_run(config_half, Path(scratch) / "run-half")
        shards, shards_half = len(complete_shards(run)), len(complete_shards(run_half))
        batches = _decoded_batches(config, run)
        bare_samples = sum(len(captions) for _, captions in batches)
        # The machine's speed drifts (a shared VM): half the bare loop runs before the stage, half after.
        middle = len(batches) // 2
        log(f"bare loop over {bare_samples} decoded images in {len(batches)} batches, first half")
        bare_before, threads = _timed_bare_loop(config, batches[:middle])
        log(f"the stage on {images} images in {shards} raw shards")
        samples, stage_seconds, peak_mb = _timed_stage(config, run)
        steady_rate, steady_seconds = _steady_rate(run)
        log("bare loop, second half")
        bare_after, _ = _timed_bare_loop(config, batches[middle:])
        log(f"the stage on {shards_half} raw shards, for its peak memory")
        samples_half, _, peak_mb_half = _timed_stage(config_half, run_half)

    bare_seconds = bare_before + bare_after
    stage_rate, bare_rate = samples / stage_seconds, bare_samples / bare_seconds
    return {
        "bench": "encode",
        # The stream's rate (first part to last) over the bare loop's; wall_ratio adds the start-up.
        "ratio": ratio(steady_rate, bare_rate),
        "samples_per_s": round(steady_rate, 1),
        "wall_ratio": ratio(stage_rate, bare_rate),
        "wall_samples_per_s": round(stage_rate, 1),
        "steady_seconds": round(steady_seconds, 2),
        "bare_samples_per_s": round(bare_rate, 1),
        "samples": samples,
        "bare_samples": bare_samples,
        "shards": shards,
        "batch_size": config.encode.batch_size,
        "threads": threads,
        "stage_seconds": round(stage_seconds, 2),
        "bare_seconds": round(bare_seconds, 2),
        # What the stage spends beyond the bare forward passes: start-up (the actor's imports
        # and model loading) and anything that leaves the encoder idle.
        "overhead_seconds": round(stage_seconds - samples / bare_rate, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_mb_half_shards": round(peak_mb_half, 1),
        "samples_half_shards": samples_half,
        "shards_half": shards_half,
        "memory_growth_2x": ratio(peak_mb, peak_mb_half),
        "device": "cuda" if config.encode.gpus_per_actor and torch.cuda.is_available() else "cpu",
    }
