"""Resumable checkpoints (DeepSpeed state through Ray Train) and diffusers-format exports.

A checkpoint is `RUN/train/checkpoints/step-NNNNNNN/`: the DeepSpeed engine state of every
rank under `deepspeed/` (Ray Train merges the ranks' folders), the moving average of the
weights under `ema/` (train.ema), `train_state.json` (step, where the data order stands, the resolution phases)
and a `COMMITTED` marker rank 0 writes once every rank's upload has returned. Right after it,
rank 0 prunes to the newest `keep_checkpoints` committed ones (`train.retention`; Ray Train keeps
every folder); a run (rerun, or restarted by Ray Train) resumes from the newest folder with the marker.

An export is `RUN/train/export/step-NNNNNNN/{unet,scheduler}` in diffusers format
(safetensors), for a text-conditional run a whole StableDiffusionPipeline folder (`train.pipeline_export`:
vae, text_encoder, tokenizer, model_index.json, a model card), plus `unet_online` when there is a moving average (then `unet` holds it) and,
for class-conditional training, `classes.json` (the mode and the class names; the UNet config's
num_class_embeds counts them plus the null class), published with `RunDir.put_dir` (marker last). Exports are for others to load.

DeepSpeed unpickles its own files with `weights_only=False`; resume and `make_universal` read them
inside `train.safe_load.weights_only_loads`, so every one is loaded with `weights_only=True` and an
allowlist of DeepSpeed's plain state classes, and a planted pickle is refused naming the file.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core import faults, layout
from pipeline.core.config import PipelineConfig, TrainConfig
from pipeline.core.rundir import RunDir, now
from train import distributed, lora, masters, phases, pipeline_export
from train.ema import ExponentialMovingAverage, averaged_parameters, weights_replaced
from train.order import BatchPosition
from train.retention import prune_checkpoints
from train.safe_load import UnsafeCheckpointError, weights_only_loads
from train.step import make_noise_scheduler

DEEPSPEED_TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"  # the same state, each parameter whole: loads at any world size
STATE_FILE = phases.STATE_FILE


@dataclass
class TrainState:
    """What a checkpoint must add to the engine state for the run to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data order resumes at (epoch, taken): samples taken from each stream (train.order)
    taken: int = 0
    streams: int = 0  # the data order's streams, fixed for the run (0: not chosen yet)
    skipped_nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    skipped_in_a_row: int = 0  # the current streak of them; a finite loss resets it
    phases: list[dict] = field(default_factory=list)  # resolution and first step of each phase (train.phases)

    def advance(self, position: BatchPosition, skipped: bool, step: int) -> None:
        self.epoch, self.taken = position.epoch, position.next_taken
        self.skipped_nonfinite += int(skipped)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.step = step

    def nonfinite_streak_error(self, max_streak: int) -> str | None:
        """Why training must stop, once `max_streak` micro-batches in a row had a non-finite loss; else None.

        Isolated non-finite losses are skipped; a streak means the weights themselves went bad.
        """
        if self.skipped_in_a_row < max_streak:
            return None
        return (
            f"the loss was not finite for {self.skipped_in_a_row} micro-batches in a row after step {self.step} "
            f"(train.max_nonfinite_streak = {max_streak}): training diverged; try a lower train.lr or fp32 precision"
        )


def is_due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def save_checkpoint(
    engine,
    run: RunDir,
    state: TrainState,
    metrics: dict,
    ema: ExponentialMovingAverage | None = None,
    keep: int | None = None,
    adapters_only: bool = False,
) -> None:
    """Every rank saves its engine state (and its part of the EMA) and reports it; collective.

    `adapters_only` (train.lora) leaves the frozen base out: it is train.init_from's, loaded again on resume.

    Once rank 0 has committed it, it prunes older checkpoints down to the newest `keep` committed
    ones (`train.retention`; None: none pruned). Never before: killed in between, the run would
    keep no checkpoint to resume from.
    """
    import ray.train

    name = layout.step_name(state.step)
    with tempfile.TemporaryDirectory(prefix="checkpoint-", ignore_cleanup_errors=True) as local:
        engine.save_checkpoint(local, tag=DEEPSPEED_TAG, exclude_frozen_parameters=adapters_only)
        if ema is not None:
            ema.save(local)
        if distributed.is_rank_zero():
            saved = {**asdict(state), "world_size": distributed.world_size()}
            Path(local, STATE_FILE).write_text(json.dumps(saved) + "\n")
        faults.inject("checkpoint-files", rank=distributed.rank(), step=state.step)
        checkpoint = ray.train.Checkpoint.from_directory(local)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    distributed.barrier()  # every rank's upload has returned
    if distributed.is_rank_zero():
        faults.inject("checkpoint-commit", step=state.step)
        run.write_text(f"{layout.TRAIN_CHECKPOINTS}/{name}/{layout.COMMIT_MARKER}", now() + "\n")
        if keep is not None:
            pruned = prune_checkpoints(run, keep)
            if pruned:
                distributed.log(f"pruned checkpoints {pruned} (train.keep_checkpoints = {keep})")


def resume(engine, run: RunDir, ema: ExponentialMovingAverage | None = None, adapters_only: bool = False) -> TrainState:
    """Load the latest committed checkpoint into `engine` (and `ema`); a fresh state if none.

    Only COMMITTED folders count: a folder without it may be half uploaded (a rank died between
    files), and DeepSpeed's own `latest` file inside it is written before its final barrier, so
    it is never read (the tag is explicit). Ray Train's own record of the latest checkpoint is not
    used either: its controller registers a report some time after the workers made it, so a run
    killed in between would resume from an older checkpoint, or from none. A checkpoint saved
    without an EMA starts one from the weights it holds.

    Each rank copies only its part of the folder (`rank_files`). A checkpoint written by another
    number of workers is loaded from its universal form (`make_universal`, which the train stage's
    driver runs first): DeepSpeed reshards the weights and the optimizer state, and `ema` its average.
    """
    steps = run.committed_steps(layout.TRAIN_CHECKPOINTS)
    if not steps:
        return TrainState()
    relative = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(steps[-1])}"
    saved = run.read_json(f"{relative}/{STATE_FILE}")
    saved_world, world = saved.pop("world_size"), distributed.world_size()
    elastic = saved_world != world
    if elastic and not run.exists(f"{relative}/{UNIVERSAL_TAG}/{layout.COMMIT_MARKER}"):
        raise RuntimeError(
            f"{run.path(relative)} was written by {saved_world} workers and has no universal form for {world}: "
            "the train stage makes it before the workers start (train.checkpoint.make_universal)"
        )
    state = TrainState(**saved)
    keep = rank_files(distributed.rank(), saved_world if not elastic else None)
    with tempfile.TemporaryDirectory(prefix="resume-", ignore_cleanup_errors=True) as scratch:
        local = run.get_dir(relative, scratch, keep)  # the folder itself on local storage
        if elastic:
            engine._config.load_universal_checkpoint = True  # read once, at this load only
        try:
            with weights_only_loads():  # a planted file is refused, never unpickled (train.safe_load)
                loaded, _ = engine.load_checkpoint(
                    str(local), tag=UNIVERSAL_TAG if elastic else DEEPSPEED_TAG, load_module_strict=not adapters_only
                )
        except UnsafeCheckpointError as error:
            raise _in_run(error, run, relative, local) from None
        finally:
            engine._config.load_universal_checkpoint = False
        if ema is not None and not ema.load(str(local), saved_world):
            ema.restart()
            distributed.log(f"{run.path(relative)} has no EMA of the weights; starting one from its weights")
    if loaded is None or engine.global_steps != state.step:
        raise RuntimeError(f"checkpoint {run.path(relative)} could not be loaded (engine at step {engine.global_steps})")
    if distributed.is_rank_zero():
        resumes = run.read_json(layout.TRAIN_RESUMES) if run.exists(layout.TRAIN_RESUMES) else []
        run.write_json(layout.TRAIN_RESUMES, [*resumes, {"step": state.step, "at": now(), "workers": [saved_world, world]}])
    resharded = f", resharded from {saved_world} workers to {world}" if elastic else ""
    distributed.log(
        f"resumed from {run.path(relative)} at step {state.step} (epoch {state.epoch}, {state.taken} samples into each of "
        f"{state.streams} data streams){resharded}"
    )
    return state


def _in_run(error: UnsafeCheckpointError, run: RunDir, relative: str, local: str | Path) -> UnsafeCheckpointError:
    """`error` naming the file in the run directory, not its local copy."""
    try:
        inside = Path(error.path).resolve().relative_to(Path(local).resolve()).as_posix()
    except ValueError:
        return error
    path = run.path(f"{relative}/{inside}")
    return UnsafeCheckpointError(path, str(error).replace(error.path, path))


_RANK_FILE = re.compile(r"(?:^|/)(?:zero_pp_rank_|rank-)(\d+)[_.]")


def rank_files(rank: int, saved_world: int | None) -> Callable[[str], bool]:
    """Which files of a checkpoint folder rank `rank` copies to resume.

    Same world size (`saved_world` given): the shared files and its own ZeRO partition and EMA
    part, never another rank's or the universal form. Another world size (None): the universal
    form, the shared files and every rank's EMA part (to reshard it), nothing of DeepSpeed's own.
    """

    def keep(name: str) -> bool:
        if name.startswith(f"{UNIVERSAL_TAG}/"):
            return saved_world is None
        match = _RANK_FILE.search(name)
        if name.startswith(f"{DEEPSPEED_TAG}/"):
            return saved_world is not None and (match is None or int(match.group(1)) == rank)
        return match is None or saved_world is None or int(match.group(1)) == rank

    return keep


def make_universal(run: RunDir, world: int) -> str | None:
    """If the newest committed checkpoint was written by another number of workers than `world`,
    write its universal form (DeepSpeed's `ds_to_universal`: each parameter's fp32 weights and
    optimizer state whole) into it, once; returns what was done, or None.

    Runs where it is called (the train stage runs it as a Ray task before the workers start): it
    reads every rank's partition, which only a change of world size needs.
    """
    steps = run.committed_steps(layout.TRAIN_CHECKPOINTS)
    if not steps:
        return None
    relative = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(steps[-1])}"
    saved_world = run.read_json(f"{relative}/{STATE_FILE}")["world_size"]
    if saved_world == world or run.exists(f"{relative}/{UNIVERSAL_TAG}/{layout.COMMIT_MARKER}"):
        return None
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with tempfile.TemporaryDirectory(prefix="universal-", ignore_cleanup_errors=True) as scratch:
        source = run.get_dir(f"{relative}/{DEEPSPEED_TAG}", Path(scratch, "in"))
        target = Path(scratch, "out")
        arguments = argparse.Namespace(
            input_folder=str(source),
            output_folder=str(target),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our engines are not Megatron's: the layout it needs is plain
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():  # its prints are not ours to show
                ds_to_universal(arguments)
        except UnsafeCheckpointError as error:
            raise _in_run(error, run, f"{relative}/{DEEPSPEED_TAG}", source) from None
        run.put_dir(target, f"{relative}/{UNIVERSAL_TAG}")
    return f"{run.path(relative)}: written by {saved_world} workers, universal form made for {world}"


def classes_record(config: TrainConfig, classes: list[str] | None, class_field: str | None) -> dict | None:
    """What classes.json holds: how the UNet is conditioned and its class names (label order); the
    null class is index len(classes). None for text conditioning."""
    if "class" not in config.conditioning:
        return None
    classes = list(classes or [])
    return {"conditioning": config.conditioning, "class_field": class_field, "classes": classes, "null_class": len(classes)}


def export_model(
    engine,
    run: RunDir,
    config: TrainConfig,
    step: int,
    ema: ExponentialMovingAverage | None = None,
    classes: dict | None = None,
    pipeline: PipelineConfig | None = None,
) -> None:
    """Rank 0 writes the UNet and its noise schedule in diffusers format; collective under ZeRO-3.

    With the run's whole config (`pipeline`), `scheduler/` is the sampler it validates with, and a
    text-conditional export is a whole diffusers pipeline folder (`train.pipeline_export`); without it
    (tests of the weights alone), `scheduler/` is the training DDPM schedule.

    With `ema`, `unet/` holds the averaged weights (what sampling and StableDiffusionPipeline load)
    and `unet_online/` the raw ones. `classes` (`classes_record`) is written as classes.json.
    Both are fp32 whatever `train.precision`: the trained weights are the optimizer's fp32 masters
    (`train.masters`), not the module's bf16 copies, so `init_from` an export resumes from them.

    A committed export is never rewritten: a run killed between an export and its checkpoint
    redoes the steps from the checkpoint before, and resume is exact, so it would write the same
    weights, while on an object store old and new files would mix under the old marker meanwhile
    (and the sample stage may have validated them). Every rank checks before the first collective,
    and rank 0 commits only after it, so all ranks agree.
    """
    relative = f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}"
    if run.exists(f"{relative}/{layout.COMMIT_MARKER}"):
        distributed.log(f"{run.path(relative)} is committed already (an earlier attempt got this far): kept as it is")
        return
    trainable = averaged_parameters(engine.module)
    kind = masters.layout(trainable)
    online = masters.whole(trainable, masters.local_parts(trainable, getattr(engine, "optimizer", None)), kind)
    averaged = ema.full_weights() if ema is not None else None  # both collective under ZeRO 1-3
    with distributed.full_parameters(engine, config.zero_stage):
        if distributed.is_rank_zero():
            with tempfile.TemporaryDirectory(prefix="export-") as local:
                unet, shared = engine.module, {}
                if config.lora is not None:
                    shared = lora.write_export(local, run, unet, online, averaged, config)
                else:
                    online_folder = layout.EXPORT_UNET if averaged is None else layout.EXPORT_UNET_ONLINE
                    with weights_replaced(unet, online):
                        unet.save_pretrained(f"{local}/{online_folder}", safe_serialization=True)
                    if averaged is not None:
                        with weights_replaced(unet, averaged):
                            unet.save_pretrained(f"{local}/{layout.EXPORT_UNET}", safe_serialization=True)
                scheduler = make_noise_scheduler(config) if pipeline is None else pipeline_export.sampler(pipeline)
                scheduler.save_pretrained(f"{local}/{layout.EXPORT_SCHEDULER}")
                if classes is not None:
                    Path(local, layout.EXPORT_CLASSES).write_text(json.dumps(classes, indent=1))
                if pipeline is not None and pipeline_export.whole(pipeline):
                    shared |= pipeline_export.shared_components(run, pipeline)
                    pipeline_export.write_pipeline_files(local, run, pipeline, step, type(scheduler).__name__)
                run.put_dir(local, relative, shared)
