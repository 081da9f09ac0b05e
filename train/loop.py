"""The function every Ray Train worker runs: build, resume, loop over `train_step`, save.

`train.stage.run_stage` starts it through `TorchTrainer`; `loop_config` holds only plain
data (the run URL and the config as JSON), so the same call works on any cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core import faults, layout
from pipeline.core.config import PipelineConfig
from pipeline.core.rundir import RunDir
from train import distributed
from train.checkpoint import TrainState, classes_record, export_model, is_due, resume, save_checkpoint
from train.data import LatentSpec, read_spec
from train.ema import ExponentialMovingAverage
from train.engine import make_engine, restart_schedule
from train.finetune import load_unet, make_trainable, worker_folder
from train.metrics import LogWindow, MetricsLog
from train.order import DataOrder
from train.phases import begin_phase, latent_resolution
from train.profile import StepProfile
from train.step import loss_options, make_noise_scheduler, train_step
from train.stream import ShardStream
from train.unet import build_unet, class_embedding_count, parameter_count


@dataclass
class WorkerContext:
    """What a training worker has built before its first step (`setup_worker`)."""

    config: PipelineConfig
    """The run's config, as the driver resolved it."""
    run: RunDir
    """The run directory."""
    rank: int
    """This worker's rank, 0 to world size - 1."""
    spec: LatentSpec
    """The encode manifest: shapes, members, classes and every latent shard's sample counts."""
    engine: Any
    """The fresh DeepSpeed engine around the UNet and its optimizer (resumed by the caller)."""
    parameter_count: int
    """The UNet's parameters, counted before ZeRO-3 would shard them."""


def setup_worker(loop_config: dict) -> WorkerContext:
    """A worker up to its fresh engine: config, the encode manifest, UNet and engine (no latent read yet)."""
    config = PipelineConfig.model_validate(loop_config["config"])
    train, run = config.train, RunDir(loop_config["run_url"])
    distributed.setup(train)
    data = read_spec(run)
    distributed.seed_initial_weights(config.seed)
    if train.init_from:  # fine-tuning; the driver checked that it fits (train.stage.check_inputs)
        unet = load_unet(worker_folder(train, loop_config.get("init_folder")), data.sample_size)
    else:
        class_embeds = class_embedding_count(train.conditioning, data.classes)
        unet = build_unet(train.unet, data.cross_attention_dim, data.sample_size, num_class_embeds=class_embeds)
    counts = make_trainable(unet, train)  # train.lora: its adapters; else what train.freeze leaves
    parameters = parameter_count(unet)  # before ZeRO-3 would shard them
    distributed.log(
        f"UNet {'from ' + train.init_from if train.init_from else 'built fresh'}: "
        f"{counts['trainable']:,} trainable and {counts['frozen']:,} frozen parameters"
    )
    return WorkerContext(config, run, distributed.rank(), data, make_engine(unet, train), parameters)


def train_worker(loop_config: dict) -> None:
    entered = time.perf_counter()
    worker = setup_worker(loop_config)
    config, run, rank, data, engine = worker.config, worker.run, worker.rank, worker.spec, worker.engine
    train = config.train
    ema = ExponentialMovingAverage.of(engine, train)  # None when train.ema_decay is 0
    state = resume(engine, run, ema, adapters_only=train.lora is not None)
    if begin_phase(state, latent_resolution(run)):  # latents of another resolution: go on from this checkpoint
        distributed.log(f"phase {len(state.phases)}: {state.phases[-1]['resolution']} px from step {state.step}")
    restart_schedule(engine, train)
    noise_scheduler = make_noise_scheduler(train)
    options = loss_options(train, None if data.classes is None else len(data.classes))  # min-SNR, offset noise, classes
    classes = classes_record(train, data.classes, data.class_field)
    empty_caption = torch.from_numpy(data.empty_caption_embedding).float()
    metrics = MetricsLog(run, state.step, distributed.is_rank_zero(), config, {"total": worker.parameter_count})
    window = LogWindow()
    profile = StepProfile(train.profile, run, state.step)
    start_export = f"{layout.TRAIN_EXPORT}/{layout.step_name(0)}/{layout.COMMIT_MARKER}"
    if state.step == 0 and train.init_from and not run.exists(start_export):
        export_model(engine, run, train, 0, ema, classes, config)  # the starting point, validated like the exports after it

    order = data_order(worker, state)
    world, batch_size = distributed.world_size(), train.batch_size_per_worker
    stream = ShardStream(run, data, pin=train.use_gpu)
    _log_start(worker, state, order)
    batches = order.batches(rank, world, batch_size, state.epoch, state.taken)
    stopped = None  # why training diverged; every rank agrees, as it does on `skipped`
    recorded: list[dict] = []  # train.record_samples: the steps since the last checkpoint
    profile.first_step(entered)
    while state.step < train.max_steps:
        profile.step_started()
        with profile.phase("data"):
            position = next(batches)
            generator = distributed.batch_generator(config.seed, rank, position.epoch, position.taken)
            batch = stream.batch(position, generator)  # flips and posterior draws, then train_step's draws
        result = train_step(
            engine, batch, noise_scheduler, empty_caption, train.caption_dropout, generator, phase=profile.phase, **options
        )
        previous_step = state.step
        state.advance(position, result["skipped"], engine.global_steps)
        if train.record_samples:
            recorded.append({"step": state.step, "epoch": position.epoch, "keys": stream.keys(position)})
        window.add(result["loss"], len(position.samples))
        stopped = state.nonfinite_streak_error(train.max_nonfinite_streak)
        if stopped:
            break  # save nothing: the last checkpoint keeps the last good weights
        if state.step == previous_step:
            continue  # inside a gradient accumulation window, or a skipped step
        faults.inject("train-step", rank=rank, step=state.step)
        if ema is not None and engine.was_step_applied():  # not after an fp16 overflow's skipped step
            with profile.phase("ema"):
                ema.update()
        if is_due(state.step, train.log_every, train.max_steps):
            with profile.phase("log"):
                metrics.add(window.row(state.step, engine))
        if is_due(state.step, train.checkpoint_every, train.max_steps):
            if not distributed.all_ranks_finite_parameters(engine.module):  # a finite loss, then a bad update
                stopped = f"the weights are not finite after step {state.step}: training diverged; not saving them"
                break
            _save(engine, run, config, state, metrics, ema, classes, profile)
            if recorded:
                rows = "".join(json.dumps(row) + "\n" for row in recorded)
                run.write_text(f"{layout.TRAIN_SAMPLES}/{layout.step_name(state.step)}-rank-{rank}.jsonl", rows)
                recorded.clear()
            window.restart()
        profile.step_done(engine)

    stream.close()
    distributed.log(f"latent shards read by rank 0: {stream.counts()}")
    profile.report()
    _finish(state, metrics, run, stopped)


def _save(
    engine,
    run: RunDir,
    config: PipelineConfig,
    state: TrainState,
    metrics: MetricsLog,
    ema: ExponentialMovingAverage | None,
    classes: dict | None,
    profile: StepProfile,
) -> None:
    """Export (rank 0), publish metrics, then the resumable checkpoint (every rank)."""
    with profile.phase("export"):
        export_model(engine, run, config.train, state.step, ema, classes, config)
        metrics.publish()
    with profile.phase("checkpoint"):
        save_checkpoint(
            engine,
            run,
            state,
            _summary(state, metrics),
            ema,
            config.train.keep_checkpoints,
            adapters_only=config.train.lora is not None,
        )
    profile.write()  # so far: a run stopped before its end keeps its profile


def _finish(state: TrainState, metrics: MetricsLog, run: RunDir, stopped: str | None) -> None:
    """The last report carries the summary the driver returns (every rank must report).

    A diverged run leaves `stopped` in RUN/train/stopped.json and returns normally, and the driver
    raises it: raised here, it would be a worker failure that Ray Train retries (train.max_failures)
    from the same checkpoint, with the same data and noise, into the same divergence.
    """
    import ray.train

    metrics.close()
    summary = _summary(state, metrics)
    if stopped and distributed.is_rank_zero():
        run.write_json(layout.TRAIN_STOPPED, {"step": state.step, "reason": stopped})
    ray.train.report(summary)
    distributed.log(f"stopped at step {state.step}: {stopped}" if stopped else f"done at step {state.step}: {summary}")


def _summary(state: TrainState, metrics: MetricsLog) -> dict:
    return {
        "step": state.step,
        "final_loss": metrics.final_loss,
        "samples_per_s": metrics.samples_per_s,
        "skipped_nonfinite": state.skipped_nonfinite,
    }


def data_order(worker: WorkerContext, state: TrainState) -> DataOrder:
    """The run's data order; a fresh run fixes its number of streams (train.data_streams, or the worker count)."""
    train = worker.config.train
    if not state.streams:
        state.streams = train.data_streams or distributed.world_size()
    elif train.data_streams and train.data_streams != state.streams:
        raise ValueError(
            f"train.data_streams = {train.data_streams}, but this run's order has {state.streams} streams since its "
            "first step; unset it (or set it back) to go on, or start a new run directory"
        )
    order = DataOrder(worker.spec.shard_counts, state.streams, train.shuffle_window_shards, worker.config.seed)
    order.check(distributed.world_size(), train.batch_size_per_worker)
    return order


def _log_start(worker: WorkerContext, state: TrainState, order: DataOrder) -> None:
    world, batch = distributed.world_size(), worker.config.train.batch_size_per_worker
    plan = order.plan(state.epoch, world, batch)
    buckets = f"; bucket remainders left out {plan.dropped_by_bucket}" if plan.dropped_by_bucket else ""
    distributed.log(
        f"{worker.parameter_count / 1e6:.1f}M-parameter UNet, {world} workers; {len(order.shards)} latent shards "
        f"({order.total_samples} samples) in {order.streams} streams, windows of {order.window} shards; epoch "
        f"{state.epoch}: {plan.steps} steps, {len(plan.shards_dropped)} shard(s) and {plan.samples_dropped} sample(s) "
        f"left out{buckets}; starting at step {state.step}"
    )
