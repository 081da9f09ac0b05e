"""`pipeline bench train`: the train stage against a bare torch loop, and ZeRO-3's memory per rank.

Speed. Both sides train the tiny preset's UNet on the same synthetic latents (written as the
encode stage would, with the configured encoders' identity records, so nothing is encoded),
batch by batch in the same data order, with the same intra-op threads. The stage is
`train.stage.run_stage` as a run calls it, with one worker and ZeRO 0: Ray Train, DeepSpeed,
the data order, metrics, and the checkpoint and export it always writes at the last step. The
baseline is one process calling `train_step` with `PlainEngine` (the UNet, torch AdamW, the
same loss and gradient clipping) on batches stacked beforehand, half before the stage and half
after, because a shared machine drifts.

The stage has three rates, all in the JSON:
- `samples_per_s`, the steady state: from the stage's own `train/metrics.jsonl`, the log
  windows after the first (which holds the first steps' warm-up), as samples summed over
  window seconds summed. Like the bare loop, that is consecutive steps after a warm-up on a
  wall clock, so `ratio` is this rate over the bare one.
- `stage_wall_samples_per_s`: every trained sample over `run_stage`'s whole wall clock (the
  workers' start, data loading, engine build and the final checkpoint too); `wall_ratio`.
- `stage_summary_samples_per_s`: what `run_stage` itself reports, the mean of the windows'
  rates with the first one included.

How near the cores' limit a step is: `cpu_mfu`, the steady rate times the UNet's training FLOPs per
sample (forward and backward, counted by torch's FlopCounterMode: `pipeline.plan.UNET_TRAIN_FLOPS`,
which tests/pipeline/test_plan.py recounts) over the FLOP/s of a plain fp32 matmul on the same
threads, measured before and after the stage (the faster of the two); `bare_cpu_mfu` likewise for
the bare loop.

Memory. On 2 workers, a few steps with ZeRO 0 and then ZeRO 3, after which every rank counts
the bytes of parameters and optimizer state it holds (each storage once, see `held_bytes`);
`zero3_memory_ratio` is the largest rank's ZeRO-3 total over the largest rank's ZeRO-0 total
(ideally 1 / workers). Gradients, activations and communication buffers are not counted.
ZeRO-3 keeps parameters smaller than `stage3_param_persistence_threshold` whole on every rank,
on top of their partitions (`whole_parameters` in the JSON). The stage sets it to 10 x the
UNet's widest block (see `train.engine.deepspeed_config`); at DeepSpeed's default, 1e5
elements, 44% of the tiny UNet stayed whole and the ratio was 0.648 instead of about 0.5.

    pipeline bench train --images 4800 --cpus 2
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import SAMPLES_PER_SHARD, Stopwatch, logger, ratio, ray_session, torch_threads
from pipeline.core import layout
from pipeline.core.arrays import from_base64_npy, to_base64_npy, to_npy_bytes
from pipeline.core.config import PipelineConfig, load_config
from pipeline.core.rundir import RunDir

# 150 steps of the preset's batch of 32: about 40 s of training on one thread of a 2-core machine,
# where the whole bench (two bare halves, the stage's start-up, two ZeRO runs) takes 2.5 minutes.
DEFAULT_IMAGES = 4800
# Log windows of the stage (the first is the warm-up the steady state leaves out).
LOG_EVERY = 10
# Bare-loop steps before each timed half: the first steps allocate the optimizer state.
BARE_WARMUP_STEPS = 3
MEMORY_WORKERS = 2
MEMORY_STEPS = 2

log = logger("train")


def _bench_config(steps: int, cpus: int) -> PipelineConfig:
    """The tiny preset with one ZeRO-0 worker of one thread, trained for `steps` steps; one
    checkpoint, at the last step (`run_stage` always saves there)."""
    preset = load_config("tiny").train
    overrides = [
        "train.num_workers=1",
        "train.zero_stage=0",
        "train.threads_per_worker=1",
        f"train.max_steps={steps}",
        f"train.warmup_steps={min(preset.warmup_steps, steps)}",
        f"train.checkpoint_every={steps + 1}",
        f"train.log_every={_log_every(steps)}",
        f"ray.num_cpus={cpus}",
    ]
    return load_config("tiny", overrides=overrides)


def _log_every(steps: int) -> int:
    """LOG_EVERY, or less for short runs, so that the steady state has at least 3 windows."""
    return max(1, min(LOG_EVERY, steps // 4))


def _memory_config(config: PipelineConfig, zero_stage: int, cpus: int) -> PipelineConfig:
    """`config` on MEMORY_WORKERS workers of at most a CPU each, for MEMORY_STEPS steps of ZeRO `zero_stage`."""
    data = config.model_dump()
    data["train"].update(
        num_workers=MEMORY_WORKERS,
        cpus_per_worker=min(1.0, cpus / MEMORY_WORKERS),
        zero_stage=zero_stage,
        max_steps=MEMORY_STEPS,
        warmup_steps=MEMORY_STEPS,
    )
    return PipelineConfig.model_validate(data)


# -- data ------------------------------------------------------------------------------------


def write_synthetic_latents(
    config: PipelineConfig,
    run: RunDir,
    samples: int,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    text_width: int | None = None,
) -> int:
    """Encode-stage output of `samples` random latents and text embeddings, in shards of at most
    `samples_per_shard` (at least 2), written as encode's latent sink writes them (webdataset's
    TarWriter: KEY.latent.npy, KEY.text.npy, KEY.json); the manifest is the one encode writes for
    `config.encode`'s encoders, so the train stage's identity check passes. `text_width` narrows
    the text embeddings (and the empty caption's) to that many columns, for smaller data sets.
    Returns the number of shards."""
    from webdataset import TarWriter

    from ingest.encode.shard_io import KEY
    from ingest.encode.stage import build_manifest

    records, fixed = build_manifest(config.encode)
    if text_width is not None:
        empty = from_base64_npy(fixed["empty_caption_embedding"])[:, :text_width]
        fixed["text_embedding_shape"] = list(empty.shape)
        fixed["empty_caption_embedding"] = to_base64_npy(empty)
        fixed["bytes_per_sample"] = 2 * (len(fixed["members"]) * math.prod(fixed["latent_shape"]) + math.prod(empty.shape))
    latent_shape, text_shape = tuple(fixed["latent_shape"]), tuple(fixed["text_embedding_shape"])
    shards = max(2, -(-samples // samples_per_shard))  # one at least per memory-run worker
    rng = np.random.default_rng(config.seed)
    entries = []
    for shard, indices in enumerate(np.array_split(np.arange(samples), shards)):
        name = f"{shard:05d}.tar"
        with run.open_write(f"{layout.ENCODE_SHARDS}/{name}") as handle:
            writer = TarWriter(handle, encoder=False, mtime=0)
            for index in indices:
                sample = {KEY: f"{index:08d}"}
                for member, shape in ((layout.LATENT_KEY, latent_shape), (layout.TEXT_EMBEDDING_KEY, text_shape)):
                    sample[member] = to_npy_bytes(rng.standard_normal(shape).astype(np.float16))
                sample[layout.META_KEY] = json.dumps({"caption": f"synthetic {index}"}).encode()
                writer.write(sample)
            writer.close()
        entries.append({"name": name.removesuffix(".tar"), "parts": [name], "samples": len(indices)})
    names = [entry["parts"][0] for entry in entries]
    run.write_json(layout.ENCODE_MANIFEST, {**records, **fixed, "samples": samples, "shards": names, "latent_shards": entries})
    return shards


# -- the bare loop ---------------------------------------------------------------------------


class BareLoop:
    """`train_step` with `PlainEngine` in this process, over the stage's data order for one worker."""

    def __init__(self, config: PipelineConfig, run: RunDir):
        from train import distributed
        from train.data import load_latent_data
        from train.order import DataOrder
        from train.step import PlainEngine, make_noise_scheduler
        from train.unet import build_unet

        train = self.train = config.train
        self.seed = config.seed
        self.data = load_latent_data(run)
        spec = self.data.spec
        order = DataOrder(spec.shard_counts, 1, train.shuffle_window_shards, config.seed)
        self.positions = order.batches(0, 1, train.batch_size_per_worker)
        distributed.seed_initial_weights(config.seed)
        unet = build_unet(train.unet, spec.cross_attention_dim, spec.sample_size)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.engine = PlainEngine(unet, optimizer, train.grad_clip)
        self.noise_scheduler = make_noise_scheduler(train)
        self.empty_caption = torch.from_numpy(spec.empty_caption_embedding).float()

    def timed(self, steps: int, warmup_steps: int) -> float:
        """Seconds of `steps` steps after `warmup_steps` untimed ones; batches are stacked first."""
        from train.distributed import batch_generator
        from train.step import loss_options, train_step

        batches = []
        for _ in range(warmup_steps + steps):
            position = next(self.positions)
            generator = batch_generator(self.seed, 0, position.epoch, position.taken)
            batches.append((self.data.batch(position.samples, generator), generator))
        dropout, objective = self.train.caption_dropout, loss_options(self.train)
        with torch_threads(self.train.threads_per_worker):
            for index, (batch, generator) in enumerate(batches):
                if index == warmup_steps:
                    watch = Stopwatch()
                train_step(self.engine, batch, self.noise_scheduler, self.empty_caption, dropout, generator, **objective)
            return watch.seconds


# -- the stage -------------------------------------------------------------------------------


def steady_state(rows: list[dict], samples_per_step: int) -> tuple[int, float]:
    """(steps, seconds) of the log windows after the first, from metrics.jsonl rows.

    A row's `samples_per_s` is its window's samples over its seconds, so the seconds are
    recovered from the steps since the previous row."""
    steps, seconds = 0, 0.0
    for previous, row in itertools.pairwise(rows):
        window = row["step"] - previous["step"]
        steps += window
        seconds += window * samples_per_step / row["samples_per_s"]
    return steps, seconds


# -- memory per rank -------------------------------------------------------------------------


def held_bytes(engine) -> dict[str, int]:
    """Bytes of parameters and of optimizer state this rank holds, every storage counted once.

    `whole_parameters`: the module's parameters as they are between steps. ZeRO 0-2 keep all of
    them; ZeRO-3 empties each one outside a gather, except those it keeps whole on every rank for
    being small (below `stage3_param_persistence_threshold`, see `train.engine.deepspeed_config`).
    `parameters` adds ZeRO-3's partitions (`ds_tensor`, views into flat buffers).
    `optimizer_state`: the torch optimizer's parameters where they are not the module's (ZeRO-3's
    fp32 partitions share the partitions' storage in fp32 training) and its state (Adam's two
    moments and step counts).
    """
    seen: set[int] = set()

    def new_bytes(tensors) -> int:
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    module = list(engine.module.parameters())
    whole = new_bytes(parameter.data for parameter in module)
    partitions = new_bytes(parameter.ds_tensor for parameter in module if hasattr(parameter, "ds_tensor"))
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    own = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state = [value for values in optimizer.state.values() for value in values.values() if torch.is_tensor(value)]
    return {"parameters": whole + partitions, "whole_parameters": whole, "optimizer_state": new_bytes(own + state)}


def memory_worker(loop_config: dict) -> None:
    """Build the engine as `train.loop.train_worker` does, take the config's few steps, and write
    this rank's `held_bytes` to `loop_config["held_bytes"]`, with `{rank}` filled in."""
    from train import distributed
    from train.checkpoint import TrainState
    from train.loop import data_order, setup_worker
    from train.step import loss_options, make_noise_scheduler, train_step
    from train.stream import ShardStream

    worker = setup_worker(loop_config)
    config, spec, engine, rank = worker.config, worker.spec, worker.engine, worker.rank
    train = config.train
    noise_scheduler = make_noise_scheduler(train)
    empty_caption = torch.from_numpy(spec.empty_caption_embedding).float()
    stream = ShardStream(worker.run, spec)
    batches = data_order(worker, TrainState()).batches(rank, distributed.world_size(), train.batch_size_per_worker)
    for _ in range(train.max_steps):
        position = next(batches)
        generator = distributed.batch_generator(config.seed, rank, position.epoch, position.taken)
        batch = stream.batch(position, generator)
        train_step(engine, batch, noise_scheduler, empty_caption, train.caption_dropout, generator, **loss_options(train))
    held = {"parameter_count": worker.parameter_count, **held_bytes(engine)}
    worker.run.write_json(loop_config["held_bytes"].format(rank=rank), held)


def _held_bytes_per_rank(config: PipelineConfig, run: RunDir, storage: Path) -> list[dict]:
    """Every rank's `held_bytes` (and the UNet's parameter count) after `memory_worker`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = config.train
    log(f"held bytes per rank, {train.num_workers} workers, ZeRO {train.zero_stage}")
    name = f"zero{train.zero_stage}-memory"
    held = f"bench/{name}/rank-{{rank}}.json"
    trainer = TorchTrainer(
        memory_worker,
        train_loop_config={"run_url": run.url, "config": config.model_dump(mode="json"), "held_bytes": held},
        scaling_config=ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    trainer.fit()
    return [run.read_json(held.format(rank=rank)) for rank in range(train.num_workers)]


# -- the bench -------------------------------------------------------------------------------


def run_bench(images: int = DEFAULT_IMAGES, cpus: int = 2) -> dict[str, Any]:
    config = _bench_config(_steps(images), cpus)
    train = config.train
    steps, samples_per_step = train.max_steps, _samples_per_step(config)
    bare_steps = steps - train.log_every  # as many as the stage's steady windows hold
    with ray_session(config.ray), tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        run = RunDir(Path(scratch) / "run")
        shards = write_synthetic_latents(config, run, steps * samples_per_step)
        bare = BareLoop(config, run)
        matmul = [matmul_flops_per_s(train.threads_per_worker)]
        first_half = _timed_bare_half(bare, bare_steps // 2, "first half")
        log(f"the stage: {steps} steps of {samples_per_step} samples, {shards} latent shards, 1 worker, ZeRO 0")
        summary, stage_seconds, rows = _timed_stage(config, run)
        second_half = _timed_bare_half(bare, bare_steps - bare_steps // 2, "second half")
        matmul.append(matmul_flops_per_s(train.threads_per_worker))
        memory = {zero: _held_bytes_per_rank(_memory_config(config, zero, cpus), run, Path(scratch)) for zero in (0, 3)}
    speed = _speed_report(config, shards, summary, stage_seconds, rows, [first_half, second_half])
    return {"bench": "train", **speed, **_mfu_report(config, speed, matmul), **_memory_report(memory), "device": "cpu"}


def matmul_flops_per_s(threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a plain fp32 [size x size] matmul on `threads` intra-op threads: what these cores do at best."""
    with torch_threads(threads):
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.mm(a, b)  # warm-up
        count, watch = 0, Stopwatch()
        with watch:
            while watch.seconds < seconds:
                torch.mm(a, b, out=out)
                count += 1
    return 2 * size**3 * count / watch.seconds


def train_flops_per_sample(config: PipelineConfig) -> float:
    """The UNet's forward and backward FLOPs for one sample at the config's resolution (pipeline.plan's count)."""
    from pipeline.plan import UNET_TRAIN_FLOPS, quadratic_flops

    return quadratic_flops(UNET_TRAIN_FLOPS[config.train.unet], config.encode.resolution)


def _mfu_report(config: PipelineConfig, speed: dict[str, Any], matmul: list[float]) -> dict[str, Any]:
    flops, peak = train_flops_per_sample(config), max(matmul)
    return {
        "cpu_mfu": round(speed["samples_per_s"] * flops / peak, 4),
        "bare_cpu_mfu": round(speed["bare_samples_per_s"] * flops / peak, 4),
        "train_flops_per_sample": flops,
        "matmul_flops_per_s": round(peak),
        "matmul_flops_per_s_halves": [round(value) for value in matmul],
    }


def _steps(images: int) -> int:
    """Steps of the tiny preset's batch in `images`: at least 4, and a batch for each memory-run worker."""
    batch_size = load_config("tiny").train.batch_size_per_worker
    if images // batch_size < 4 or images < MEMORY_WORKERS * batch_size:
        raise ValueError(f"--images {images}: the bench needs at least 4 batches of {batch_size}")
    return images // batch_size


def _samples_per_step(config: PipelineConfig) -> int:
    train = config.train
    return train.batch_size_per_worker * train.gradient_accumulation * train.num_workers


def _timed_bare_half(bare: BareLoop, steps: int, which: str) -> tuple[int, float]:
    """(steps, seconds) of one half of the bare loop. Half runs before the stage and half after,
    because a shared machine drifts."""
    log(f"bare loop: {BARE_WARMUP_STEPS} warm-up steps, then {steps} timed ({which})")
    return steps, bare.timed(steps, BARE_WARMUP_STEPS)


def _timed_stage(config: PipelineConfig, run: RunDir) -> tuple[dict, float, list[dict]]:
    """(`run_stage`'s summary, its wall-clock seconds, the rows of its metrics.jsonl)."""
    from train.stage import run_stage

    with Stopwatch() as watch:
        summary = run_stage(config, run)
    rows = [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines() if line.strip()]
    return summary, watch.seconds, rows


def _speed_report(
    config: PipelineConfig,
    shards: int,
    summary: dict,
    stage_seconds: float,
    rows: list[dict],
    bare_halves: list[tuple[int, float]],
) -> dict[str, Any]:
    """The JSON's speed entries: the stage's three rates (see the module docstring) against the bare loop's."""
    train, samples_per_step = config.train, _samples_per_step(config)
    steady_steps, steady_seconds = steady_state(rows, samples_per_step)
    steady_rate = steady_steps * samples_per_step / steady_seconds
    trained = int(summary["steps"]) * samples_per_step
    wall_rate = trained / stage_seconds
    bare_steps, bare_seconds = sum(steps for steps, _ in bare_halves), sum(seconds for _, seconds in bare_halves)
    bare_rate = bare_steps * samples_per_step / bare_seconds
    return {
        "ratio": ratio(steady_rate, bare_rate),
        "samples_per_s": round(steady_rate, 2),
        "bare_samples_per_s": round(bare_rate, 2),
        # Before and after the stage: how far the machine drifted meanwhile.
        "bare_samples_per_s_halves": [round(steps * samples_per_step / seconds, 2) for steps, seconds in bare_halves],
        "wall_ratio": ratio(wall_rate, bare_rate),
        "stage_wall_samples_per_s": round(wall_rate, 2),
        "stage_summary_samples_per_s": round(summary["samples_per_s"], 2),
        "steps": int(summary["steps"]),
        "steady_steps": steady_steps,
        "bare_steps": bare_steps,
        "bare_warmup_steps": len(bare_halves) * BARE_WARMUP_STEPS,
        "log_every": train.log_every,
        "batch_size": samples_per_step,
        "threads": train.threads_per_worker,
        "shards": shards,
        "stage_seconds": round(stage_seconds, 2),
        "stage_steady_seconds": round(steady_seconds, 2),
        "bare_seconds": round(bare_seconds, 2),
        # What the stage spends beyond its steady-state steps: Ray Train's and the worker's
        # start-up, data loading, the engine, the final checkpoint and export.
        "overhead_seconds": round(stage_seconds - trained / steady_rate, 2),
    }


def _memory_report(memory: dict[int, list[dict]]) -> dict[str, Any]:
    """The JSON's memory entries: every rank's `held_bytes` with ZeRO 0 and with ZeRO 3 (the keys of `memory`)."""
    totals = {stage: [rank["parameters"] + rank["optimizer_state"] for rank in ranks] for stage, ranks in memory.items()}
    return {
        "zero3_memory_ratio": ratio(max(totals[3]), max(totals[0])),
        "memory_workers": MEMORY_WORKERS,
        "parameter_count": memory[0][0]["parameter_count"],
        "zero0_bytes_per_rank": totals[0],
        "zero3_bytes_per_rank": totals[3],
        "zero0_held_per_rank": [_without_count(rank) for rank in memory[0]],
        "zero3_held_per_rank": [_without_count(rank) for rank in memory[3]],
    }


def _without_count(held: dict) -> dict:
    return {key: value for key, value in held.items() if key != "parameter_count"}
