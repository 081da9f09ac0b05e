"""`pipeline bench scale-train`: does a training worker's cost stay flat as the data set grows?

Training streams its latent shards (`train.stream`) in an order planned from the encode
manifest's per-shard sample counts alone (`train.order`), so a worker's memory and start-up
should not depend on how many samples the run holds, and streaming should cost no speed
against data already in memory. One run measures all of it, on synthetic latent shards written
as the encode stage writes them (`write_synthetic_latents`: webdataset's TarWriter, the tiny
preset's encoders' shapes, latents [4, 8, 8] and text embeddings [77, 64] in fp16):

- `train_rss_ratio_4x` and `train_start_ratio_4x`: a training worker is a fresh Python process
  (`training_worker`) that builds the tiny UNet with `PlainEngine`, the data order (1 worker,
  1 stream, the preset's windows of 4 shards) and a `ShardStream`, then trains enough steps to
  cross WORKER_WINDOWS shuffle windows. It reports its peak RSS (VmHWM) and the seconds
  from its start (the parent's clock just before it is started: interpreter, imports and all)
  to the end of its first optimizer step. Workers run on a run of `images` samples (1x) and one
  of 4x as many, in the order 1x, 4x, 4x, 1x (a shared machine drifts); the ratios are 4x over
  1x of the mean peak RSS and of the fastest start (another process only ever delays a start).
  `train_setup_ratio_4x` is the same for the start without the interpreter and imports.
- `stream_vs_memory_ratio`: in this process, one UNet trained alternately from a `ShardStream`
  over the 1x run and from `load_latent_data` (every shard in memory), each side walking the
  same data order from its start, after a few untimed steps of each: `speed_steps` timed steps
  a side in short alternating blocks (stream then memory, then memory then stream, ...), so
  that the bursts of other processes on a shared machine, which last longer than a block, fall
  on both sides alike. Samples/s of the stream over memory's (and of each half of the blocks,
  to show the noise). The stream's reader threads share the CPUs with training, as in a run: a
  window's reads start at the stream's step that enters it and take a fraction of a step, so
  they are paid inside the stream's blocks.
- `plan_seconds_100m_64` and `plan_mb_100m_64`: one rank of 64 finding its first batch in the
  middle of an epoch of 100 million samples in 10,000 shards, from counts alone: `DataOrder`
  built from the counts, `check` (epoch 0's plan) and the first batch of rank 37 half way
  through a stream. Seconds without tracing, then the peak of tracemalloc (Python and numpy
  allocations) in a second, traced pass.

    pipeline bench scale-train            # 50,000 samples at 1x, 200,000 at 4x
    pipeline bench scale-train --images 10000
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pipeline.bench.checkpoint_reads import resume_read_ratio
from pipeline.bench.common import SAMPLES_PER_SHARD, Stopwatch, logger, peak_rss_mb, ratio, torch_threads
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir

# Samples at 1x (the worker's data set at 4x holds SCALE times as many).
DEFAULT_SAMPLES = 50_000
SCALE = 4
# Shuffle windows a worker's steps cross: the stream must read ahead and let go of shards.
WORKER_WINDOWS = 3
# Timed steps a side of the stream-vs-memory comparison, in alternating blocks of SPEED_BLOCK_STEPS,
# after SPEED_WARMUP_STEPS untimed ones a side (the optimizer's state, the stream's first window).
SPEED_STEPS = 300
SPEED_BLOCK_STEPS = 20
SPEED_WARMUP_STEPS = 3
# The plan: 10,000 shards of 10,000 samples, 64 ranks and streams, the preset's batch and window.
PLAN_SHARDS = 10_000
PLAN_SAMPLES_PER_SHARD = 10_000
PLAN_WORLD = 64
PLAN_RANK = 37


log = logger("scale-train")


def run_bench(
    images: int = DEFAULT_SAMPLES,
    cpus: int = 2,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    worker_steps: int | None = None,
    speed_steps: int = SPEED_STEPS,
    speed_block_steps: int = SPEED_BLOCK_STEPS,
    plan_shards: int = PLAN_SHARDS,
    plan_samples_per_shard: int = PLAN_SAMPLES_PER_SHARD,
    plan_world: int = PLAN_WORLD,
    plan_rank: int = PLAN_RANK,
    worker_repeats: int = 2,
) -> dict[str, Any]:
    """`images`: samples at 1x. `cpus` is taken for the CLI's uniform call only: nothing here uses Ray."""
    config = load_config("tiny")
    train = config.train
    steps = worker_steps or _steps_across_windows(train.shuffle_window_shards, samples_per_shard, train.batch_size_per_worker)
    with tempfile.TemporaryDirectory(prefix="bench-scale-train-") as scratch:
        runs = {}
        for scale in (1, SCALE):
            runs[scale] = RunDir(Path(scratch) / f"run-{scale}x")
            log(f"writing {scale * images} synthetic latent samples ({scale}x) in shards of {samples_per_shard}")
            with Stopwatch() as watch:
                _write_latents(runs[scale], scale * images, samples_per_shard)
            log(f"  {watch.seconds:.1f} s")
        workers = {1: [], SCALE: []}
        # A shared machine drifts: 1x, 4x, then 4x, 1x, ..., each as often before the other as after it.
        for scale in [scale for repeat in range(worker_repeats) for scale in (1, SCALE)[:: 1 if repeat % 2 == 0 else -1]]:
            log(f"training worker on the {scale}x run: {steps} steps")
            workers[scale].append(run_worker(runs[scale], steps, train.threads_per_worker))
        log(f"stream vs memory on the 1x run: {speed_steps} steps a side, in alternating blocks of {speed_block_steps}")
        speed = stream_vs_memory(runs[1], speed_steps, speed_block_steps)
        data = _data_report(runs)
    log(f"planning one rank's position: {plan_shards} shards of {plan_samples_per_shard} samples, {plan_world} ranks")
    plan = plan_position(plan_shards, plan_samples_per_shard, plan_world, plan_rank)
    log("bytes one of 2 ranks reads to resume a ZeRO-2 checkpoint (tiny UNet, EMA on)")
    reads = resume_read_ratio(world=2, rank=1)
    return {
        "bench": "scale-train",
        **_worker_report(workers, steps),
        "stream_vs_memory_ratio": ratio(speed["stream_samples_per_s"], speed["memory_samples_per_s"]),
        "plan_seconds_100m_64": plan["seconds"],
        "plan_mb_100m_64": plan["peak_mb"],
        **reads,
        **speed,
        **{f"plan_{key}": value for key, value in plan.items() if key not in ("seconds", "peak_mb")},
        **data,
        "samples_per_shard": samples_per_shard,
        "window_shards": train.shuffle_window_shards,
        "batch_size": train.batch_size_per_worker,
        "threads": train.threads_per_worker,
        "cpu_count": os.cpu_count(),
        "device": "cpu",
    }


def _steps_across_windows(window: int, samples_per_shard: int, batch: int) -> int:
    """Steps of `batch` that go WORKER_WINDOWS windows of `window` shards deep, and one more."""
    return math.ceil(WORKER_WINDOWS * window * samples_per_shard / batch) + 1


def _write_latents(run: RunDir, samples: int, samples_per_shard: int) -> None:
    from pipeline.bench.train import write_synthetic_latents

    write_synthetic_latents(load_config("tiny"), run, samples, samples_per_shard)


def _data_report(runs: dict[int, RunDir]) -> dict[str, Any]:
    """Sizes of the two runs: samples, shards, bytes per sample in memory and in the shard files."""
    report: dict[str, Any] = {}
    for scale, run in runs.items():
        manifest = run.read_json(layout.ENCODE_MANIFEST)
        report[f"samples_{scale}x"] = manifest["samples"]
        report[f"shards_{scale}x"] = len(manifest["latent_shards"])
        if scale == 1:
            tars = [f"{layout.ENCODE_SHARDS}/{entry['name']}.tar" for entry in manifest["latent_shards"]]
            shard_bytes = sum(os.path.getsize(run.path(tar)) for tar in tars)
            report |= {
                "sample_bytes": manifest["bytes_per_sample"],
                "shard_bytes_per_sample": round(shard_bytes / manifest["samples"]),
                "latent_shape": manifest["latent_shape"],
                "text_embedding_shape": manifest["text_embedding_shape"],
            }
    return report


# -- a training worker, in a fresh process ---------------------------------------------------


def run_worker(run: RunDir, steps: int, threads: int) -> dict[str, Any]:
    """`training_worker` in a fresh Python process: what it reports, with `start_seconds` from
    just before the process was started to the end of its first optimizer step."""
    command = [sys.executable, "-c", "from pipeline.bench.scale_train import worker_main; worker_main()"]
    request = json.dumps({"run_url": run.url, "steps": steps, "threads": threads})
    started = time.time()
    result = subprocess.run([*command, request], check=False, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the training worker exited with {result.returncode} (its stderr is above)")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["start_seconds"] = round(report.pop("first_step_at") - started, 3)
    log(f"  peak RSS {report['peak_rss_mb']} MB, first step {report['start_seconds']} s after the start")
    return report


def worker_main() -> None:
    """The worker process's entry point: the request as JSON in argv[1], the report as JSON on stdout."""
    request = json.loads(sys.argv[1])
    print(json.dumps(training_worker(request["run_url"], request["steps"], request["threads"])))


def training_worker(run_url: str, steps: int, threads: int) -> dict[str, Any]:
    """`steps` steps of the tiny UNet fed by a `ShardStream` over the run, as one worker of one
    stream would train; its peak RSS, when its first optimizer step ended (`time.time()`), and
    how many shards it read and held at most."""
    import torch

    from train import distributed
    from train.data import read_spec
    from train.order import DataOrder
    from train.step import PlainEngine, loss_options, make_noise_scheduler, train_step
    from train.stream import ShardStream
    from train.unet import build_unet

    imported = time.time()
    config = load_config("tiny")
    train, run = config.train, RunDir(run_url)
    spec = read_spec(run)
    distributed.seed_initial_weights(config.seed)
    unet = build_unet(train.unet, spec.cross_attention_dim, spec.sample_size)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    engine = PlainEngine(unet, optimizer, train.grad_clip)
    noise_scheduler = make_noise_scheduler(train)
    empty_caption = torch.from_numpy(spec.empty_caption_embedding).float()
    order = DataOrder(spec.shard_counts, 1, train.shuffle_window_shards, config.seed)
    order.check(1, train.batch_size_per_worker)
    stream = ShardStream(run, spec)
    batches = order.batches(0, 1, train.batch_size_per_worker)
    first_step_at, shards_seen = 0.0, set()
    torch.set_num_threads(threads)
    for step in range(steps):
        position = next(batches)
        shards_seen.update(shard for shard, _ in position.samples)
        generator = distributed.batch_generator(config.seed, 0, position.epoch, position.taken)
        batch = stream.batch(position, generator)
        train_step(engine, batch, noise_scheduler, empty_caption, train.caption_dropout, generator, **loss_options(train))
        if step == 0:
            first_step_at = time.time()
    stream.close()
    return {
        "peak_rss_mb": peak_rss_mb(),  # VmHWM: ru_maxrss would keep the parent's peak across the exec
        "first_step_at": first_step_at,
        "setup_seconds": round(first_step_at - imported, 3),
        "shards_trained": len(shards_seen),
        "peak_held_shards": stream.peak_held,
    }


def _worker_report(workers: dict[int, list[dict]], steps: int) -> dict[str, Any]:
    """4x over 1x of the workers' mean peak RSS and of their fastest starts (another process on a
    shared machine only ever slows a start: the fastest is the least disturbed), and every
    worker's own numbers."""

    def mean(scale: int, key: str) -> float:
        return statistics.fmean(worker[key] for worker in workers[scale])

    def fastest(scale: int, key: str) -> float:
        return min(worker[key] for worker in workers[scale])

    report: dict[str, Any] = {
        "train_rss_ratio_4x": ratio(mean(SCALE, "peak_rss_mb"), mean(1, "peak_rss_mb")),
        "train_start_ratio_4x": ratio(fastest(SCALE, "start_seconds"), fastest(1, "start_seconds")),
        # After the imports: the part of the start-up that reads the manifest, plans and reads shards.
        "train_setup_ratio_4x": ratio(fastest(SCALE, "setup_seconds"), fastest(1, "setup_seconds")),
    }
    for scale in (1, SCALE):
        report |= {
            f"rss_mb_{scale}x": round(mean(scale, "peak_rss_mb"), 1),
            f"start_seconds_{scale}x": round(fastest(scale, "start_seconds"), 3),
            f"setup_seconds_{scale}x": round(fastest(scale, "setup_seconds"), 3),
            f"workers_{scale}x": workers[scale],
        }
    return report | {"worker_steps": steps, "worker_windows": WORKER_WINDOWS}


# -- stream vs memory ------------------------------------------------------------------------


class _Feed:
    """One side of the comparison: the data order's batches for one worker, and where they come from."""

    def __init__(self, order, batch_size: int, seed: int, source):
        self.positions, self.seed, self.source = order.batches(0, 1, batch_size), seed, source
        self.steps, self.seconds = 0, 0.0

    def batch(self):
        from train.distributed import batch_generator

        position = next(self.positions)
        generator = batch_generator(self.seed, 0, position.epoch, position.taken)
        return self.source(position, generator), generator


def stream_vs_memory(run: RunDir, steps: int, block_steps: int) -> dict[str, Any]:
    """Samples/s of one UNet fed by a `ShardStream` and by every shard in memory, over the same
    order: `steps` a side in alternating blocks of `block_steps` (see the module docstring)."""
    import torch

    from train import distributed
    from train.data import load_latent_data
    from train.order import DataOrder
    from train.step import PlainEngine, loss_options, make_noise_scheduler, train_step
    from train.stream import ShardStream
    from train.unet import build_unet

    config = load_config("tiny")
    train = config.train
    with Stopwatch() as loading:
        data = load_latent_data(run)
    log(f"  every shard in memory in {loading.seconds:.1f} s")
    spec = data.spec
    order = DataOrder(spec.shard_counts, 1, train.shuffle_window_shards, config.seed)
    stream = ShardStream(run, spec)
    feeds = {
        "stream": _Feed(order, train.batch_size_per_worker, config.seed, stream.batch),
        "memory": _Feed(order, train.batch_size_per_worker, config.seed, lambda position, g: data.batch(position.samples, g)),
    }
    distributed.seed_initial_weights(config.seed)
    unet = build_unet(train.unet, spec.cross_attention_dim, spec.sample_size)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    engine = PlainEngine(unet, optimizer, train.grad_clip)
    noise_scheduler, options = make_noise_scheduler(train), loss_options(train)
    empty_caption = torch.from_numpy(spec.empty_caption_embedding).float()

    def train_on(feed: _Feed, count: int) -> float:
        with Stopwatch() as watch:
            for _ in range(count):
                batch, generator = feed.batch()
                train_step(engine, batch, noise_scheduler, empty_caption, train.caption_dropout, generator, **options)
        return watch.seconds

    pairs = max(2, steps // block_steps)
    seconds: dict[str, list[float]] = {"stream": [], "memory": []}  # one entry per block
    with torch_threads(train.threads_per_worker):
        for feed in feeds.values():
            train_on(feed, SPEED_WARMUP_STEPS)
        for pair in range(pairs):
            for side in ("stream", "memory")[:: 1 if pair % 2 == 0 else -1]:
                seconds[side].append(train_on(feeds[side], block_steps))
            if pair + 1 in (pairs // 2, pairs):
                rates = [_rate(seconds[side], block_steps, train.batch_size_per_worker) for side in ("stream", "memory")]
                log(f"  after {(pair + 1) * block_steps} steps a side: stream {rates[0]:.1f}, memory {rates[1]:.1f} samples/s")
    stream.close()
    half = pairs // 2
    stream_rate, memory_rate = (_rate(seconds[side], block_steps, train.batch_size_per_worker) for side in ("stream", "memory"))
    return {
        "stream_samples_per_s": round(stream_rate, 2),
        "memory_samples_per_s": round(memory_rate, 2),
        # The same ratio over each half of the blocks: how far the machine's noise moves it.
        "stream_vs_memory_ratio_halves": [
            ratio(sum(seconds["memory"][part]), sum(seconds["stream"][part])) for part in (slice(None, half), slice(half, None))
        ],
        "speed_steps": pairs * block_steps,
        "speed_block_steps": block_steps,
        "stream_peak_held_shards": stream.peak_held,
        "memory_load_seconds": round(loading.seconds, 2),
    }


def _rate(seconds: list[float], block_steps: int, batch_size: int) -> float:
    """Samples/s of blocks of `block_steps` steps that took `seconds` each."""
    return len(seconds) * block_steps * batch_size / sum(seconds)


# -- one rank's position, from counts alone -------------------------------------------------


def plan_position(shards: int, samples_per_shard: int, world: int, rank: int) -> dict[str, Any]:
    """Seconds and traced peak MB of `find_position` with the tiny preset's batch and window (the
    seconds without tracing, the peak in a second pass)."""
    train = load_config("tiny").train
    where = (shards, samples_per_shard, world, rank, train.batch_size_per_worker, train.shuffle_window_shards)
    with Stopwatch() as watch:
        taken = find_position(*where)
    tracemalloc.start()
    try:
        find_position(*where)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {
        "seconds": round(watch.seconds, 3),
        "peak_mb": round(peak / 2**20, 3),
        "shards": shards,
        "samples": shards * samples_per_shard,
        "world": world,
        "rank": rank,
        "taken": taken,
    }


def find_position(shards: int, samples_per_shard: int, world: int, rank: int, batch: int, window: int) -> int:
    """Rank `rank` of `world` (one stream each) takes its first batch of `batch` half way through
    epoch 0, from the shards' counts alone; returns the samples each stream had given before it."""
    from train.order import DataOrder, ShardCounts

    counts = [samples_per_shard] * shards  # as read from the manifest's latent_shards
    order = DataOrder(tuple(ShardCounts(count) for count in counts), world, window, seed=0)
    plan = order.check(world, batch)
    chunk = order.chunk(world, batch)
    taken = plan.steps // 2 * chunk
    position = next(order.batches(rank, world, batch, 0, taken))
    if len(position.samples) != batch:
        raise RuntimeError(f"rank {rank} found {len(position.samples)} samples, not {batch}")
    return taken
