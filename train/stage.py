"""The train stage: Ray Train's TorchTrainer running `train.loop.train_worker` on every worker.

Checkpoints land in `RUN/train/checkpoints/step-NNNNNNN` because the trainer's storage is
`RUN/train` and its run name is `checkpoints`. Running the stage again with the same run
directory resumes from the latest committed checkpoint (see `train.checkpoint.resume`). Within
one run, `train.max_failures` lets Ray Train restart failed workers, which resume the same way.

Assumes Ray is initialised (`pipeline.core.ray_runtime.ensure_ray`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.errors import StageFailure
from pipeline.core.identity import EncoderMismatchError, check_run_encoders
from pipeline.core.log import get_logger
from pipeline.core.resources import worker_resources
from pipeline.core.rundir import RunDir
from pipeline.core.trackers import unusable
from train import finetune, phases
from train.checkpoint import make_universal
from train.data import read_spec
from train.loop import train_worker
from train.order import DataOrder, OrderError
from train.unet import class_embedding_count

if TYPE_CHECKING:
    from ray.train import RunConfig

logger = get_logger("train")
CHECKPOINTS_RUN_NAME = layout.TRAIN_CHECKPOINTS.rsplit("/", 1)[1]
RAY_CHECKPOINTS_RECORD = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants


class TrainStageError(StageFailure):
    """Training could not start or did not finish; the message says why (if a worker crashed: Ray's, with the
    worker's traceback)."""


def run_stage(config: PipelineConfig, run: RunDir) -> dict:
    """Train (or resume) to `config.train.max_steps`; the summary for run.json."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    model = check_inputs(config, run)
    train = config.train
    init_folder = model.get("init", {}).get("folder")  # resolved here: workers run in another directory
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run_url": run.url, "config": config.model_dump(mode="json"), "init_folder": init_folder},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=worker_resources(config),
            placement_strategy=train.placement_strategy,
        ),
        run_config=run_config(config, run),
    )
    run.remove(layout.TRAIN_STOPPED)  # from an earlier attempt
    # Ray Train's record of an earlier attempt's checkpoints: its controller refuses to start when a
    # folder it names is gone, and ours prunes them (train.retention); we never read it.
    run.remove(f"{layout.TRAIN_CHECKPOINTS}/{RAY_CHECKPOINTS_RECORD}")
    resharded = reshard_checkpoint(run, train.num_workers)
    if resharded:
        logger.info(resharded)
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors; keep its message, which names the rank
        raise TrainStageError(f"training failed ({type(error).__name__}): {error}") from error
    return {**stage_summary(result.metrics or {}, run), **model}


def reshard_checkpoint(run: RunDir, workers: int) -> str | None:
    """The newest checkpoint's universal form when it was written by another number of workers
    (`train.checkpoint.make_universal`), made by one Ray task: it reads every rank's partition once.
    The task runs on the driver's node: a CPU node may hold only ingest's write credentials
    (docs/kubernetes.md), which cannot write train/."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.get(ray.remote(num_cpus=0.1, scheduling_strategy=here)(_make_universal).remote(run.url, workers))


def _make_universal(run_url: str, workers: int) -> str | None:
    return make_universal(RunDir(run_url), workers)


def run_config(config: PipelineConfig, run: RunDir) -> RunConfig:
    """Where checkpoints go, and how often Ray Train restarts failed workers.

    Ray Train keeps every checkpoint folder (no `num_to_keep`): its retention removes the oldest
    when it registers a report, which can come before rank 0 commits the new one; rank 0 prunes
    after the commit instead (`train.retention`, train.keep_checkpoints). A restart
    (train.max_failures) starts every worker's `train_worker` again, which resumes from the latest
    committed checkpoint, as a rerun of the stage does.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=CHECKPOINTS_RUN_NAME,
        storage_path=run.path(layout.TRAIN_DIR),
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        failure_config=FailureConfig(max_failures=config.train.max_failures),
    )


def stage_summary(worker_summary: dict, run: RunDir) -> dict:
    """run.json's summary from the workers' last checkpoint report; raises if they stopped early (diverged)."""
    checkpoints = run.committed_steps(layout.TRAIN_CHECKPOINTS)
    if run.exists(layout.TRAIN_STOPPED):
        kept = f"the latest checkpoint, step {checkpoints[-1]}, is intact" if checkpoints else "no checkpoint was saved"
        raise TrainStageError(f"{run.read_json(layout.TRAIN_STOPPED)['reason']}; {kept}")
    exports = run.committed_steps(layout.TRAIN_EXPORT)
    resumes = run.read_json(layout.TRAIN_RESUMES) if run.exists(layout.TRAIN_RESUMES) else []
    newest = phases.newest_state(run) or {}
    return {
        "counts": {
            "steps": worker_summary.get("step"),
            "exports": len(exports),
            "skipped_nonfinite": worker_summary.get("skipped_nonfinite"),
        },
        "steps": worker_summary.get("step"),
        "final_loss": worker_summary.get("final_loss"),
        "checkpoints": checkpoints,
        "exports": exports,
        "samples_per_s": worker_summary.get("samples_per_s"),
        "skipped_nonfinite": worker_summary.get("skipped_nonfinite"),
        # Every resume (a rerun or a Ray Train restart): the step it started from, the last one first.
        "resumed_from": [entry["step"] for entry in reversed(resumes)],
        # The multi-resolution schedule so far: each phase's resolution and first step (train.phases).
        "phases": newest.get("phases", []),
    }


def check_inputs(config: PipelineConfig, run: RunDir) -> dict:
    """Fail before any worker starts if the encode stage's output cannot feed this config, or the
    UNet it names (train.init_from, train.freeze, train.lora) cannot train on it; run.json's UNet summary."""
    if not run.exists(layout.ENCODE_MANIFEST):
        raise TrainStageError(f"{run.path(layout.ENCODE_MANIFEST)} is missing: run the encode stage first")
    problem = unusable(config.train.trackers)
    if problem:
        raise TrainStageError(problem)
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    check_order(config, run)
    stuck = phases.check_new_phase(run, config.train.max_steps)
    if stuck:
        raise TrainStageError(stuck)
    # Latents of another VAE would train a UNet that sampling (with the configured VAE) cannot use.
    try:
        check_run_encoders(config.encode, manifest, where=run.path(layout.ENCODE_MANIFEST))
    except EncoderMismatchError as error:
        raise TrainStageError(str(error)) from error
    return check_model(config, manifest)


def check_order(config: PipelineConfig, run: RunDir) -> None:
    """The latents can be ordered for this worker count and batch (with the run's streams, if it has begun)."""
    train = config.train
    try:
        spec = read_spec(run)
    except (ValueError, FileNotFoundError) as error:
        raise TrainStageError(str(error)) from error
    streams = (phases.newest_state(run) or {}).get("streams") or train.data_streams or train.num_workers
    try:
        DataOrder(spec.shard_counts, streams, train.shuffle_window_shards, config.seed).check(
            train.num_workers, train.batch_size_per_worker
        )
    except OrderError as error:
        raise TrainStageError(f"{run.path(layout.ENCODE_MANIFEST)}: {error}") from error


def check_model(config: PipelineConfig, manifest: dict) -> dict:
    """The init model fits the latents and the noise schedule, and every train.freeze entry (or
    train.lora target) names parameters (checked on the meta device: no weights loaded); their counts, and where the model came from."""
    train, latent_shape, text_shape = config.train, manifest["latent_shape"], manifest["text_embedding_shape"]
    try:
        class_embeds = class_embedding_count(train.conditioning, manifest.get("classes"))
    except ValueError as error:
        raise TrainStageError(f"{error}: rerun encode with encode.class_field set") from error
    try:
        init = finetune.resolve(train)
        if init is not None:
            finetune.check_init(init, train, latent_shape, text_shape, class_embeds)
        counts = finetune.make_trainable(finetune.meta_unet(train, init, text_shape[-1], latent_shape[-1], class_embeds), train)
    except finetune.InitModelError as error:
        raise TrainStageError(str(error)) from error
    summary = {"parameters": {**counts, "total": counts["trainable"] + counts["frozen"]}}
    if init is not None:
        summary["init"] = {
            "from": train.init_from,
            "subfolder": train.init_subfolder,
            "folder": str(init.folder),
            "sha256": init.sha256(),
        }
    return summary
