"""The train stage end to end: Ray Train + DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU workers, checkpoints,
exports (with the weights' moving average), metrics and resume (train.stage), plus its fail-fast input checks."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from synthetic_latents import write_latent_run

from pipeline.core import layout, models
from pipeline.core.config import EncodeConfig, load_config
from pipeline.core.identity import Encoders
from train.checkpoint import STATE_FILE
from train.stage import TrainStageError, check_inputs, run_config, run_stage, stage_summary

# Constant lr makes the schedule independent of max_steps, so 6 steps resumed to 9 must
# equal 9 steps in one go if resume is exact (weights, optimizer, data order, noise, and the
# flip choices and posterior draws of latents encoded with both encode options), and so must the
# moving average of the weights (the tiny preset keeps one, train.ema_decay = 0.999).
OVERRIDES = [
    # The 4.2M-parameter UNet and lr these tests were calibrated on (the demo's micro UNet at 1e-3 would
    # make the ZeRO-2 against ZeRO-3 comparison's reduction-order noise about 50 times larger).
    "train.unet=tiny",
    "train.lr=5e-4",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.zero_stage=2",
    "train.batch_size_per_worker=8",
    "train.warmup_steps=0",
    'train.lr_schedule="constant"',
    "train.checkpoint_every=3",
    "train.keep_checkpoints=3",
    "train.log_every=1",
]


AUGMENTED = EncodeConfig(store_distribution=True, flip_copies=True)


def config(max_steps: int, *overrides: str):
    return load_config("tiny", overrides=[*OVERRIDES, f"train.max_steps={max_steps}", *overrides])


def metrics_rows(run) -> list[dict]:
    return [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines()]


def export_weights(run, step: int, unet: str = layout.EXPORT_UNET) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}/{unet}")).state_dict()


def flat_weights(run, step: int, unet: str) -> torch.Tensor:
    return torch.cat([weight.flatten() for weight in export_weights(run, step, unet).values()])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=rtol, atol=atol, msg=lambda text, name=name: f"{name}: {text}")


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, ray_local):
    """A ZeRO-2 run of 6 steps (checkpoints and exports at 3 and 6): (run, stage summary, seconds).

    The resume test extends it to 9 steps; the ZeRO-3 test reads only its step-6 export.
    """
    run = write_latent_run(tmp_path_factory.mktemp("zero2") / "run", encode=AUGMENTED)
    started = time.perf_counter()
    summary = run_stage(config(6), run)
    return run, summary, time.perf_counter() - started


def test_train_stage_checkpoints_exports_and_resumes_exactly(tmp_path, six_steps):
    run, first, seconds = six_steps

    assert first["steps"] == 6 and first["checkpoints"] == [3, 6] and first["exports"] == [3, 6]
    assert first["skipped_nonfinite"] == 0 and first["final_loss"] > 0 and first["samples_per_s"] > 0
    for step in (3, 6):
        checkpoint = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(step)}"
        assert run.exists(f"{checkpoint}/{layout.COMMIT_MARKER}")
        assert run.read_json(f"{checkpoint}/{STATE_FILE}")["step"] == step
        assert run.list(f"{checkpoint}/ema") == ["rank-0.pt", "rank-1.pt"]  # each rank saves half of the average
        export = f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}"
        assert run.exists(f"{export}/{layout.COMMIT_MARKER}")
        assert DDPMScheduler.from_pretrained(run.path(f"{export}/scheduler")).config.clip_sample is False
    assert not all(torch.equal(a, b) for a, b in zip(export_weights(run, 3).values(), export_weights(run, 6).values()))
    averaged, online = export_weights(run, 6), export_weights(run, 6, layout.EXPORT_UNET_ONLINE)
    assert not all(torch.equal(averaged[name], online[name]) for name in averaged)  # the average lags the weights
    assert [row["step"] for row in metrics_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert run.list(layout.TRAIN_LOGS)
    global_batch = 2 * 8
    print(f"\nrun_stage, 6 steps: {seconds:.1f} s wall; {global_batch / first['samples_per_s']:.3f} s per step in the loop")

    marker = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(3)}/{layout.COMMIT_MARKER}")
    written = os.stat(marker).st_mtime_ns
    second = run_stage(config(9), run)
    assert second["steps"] == 9 and second["checkpoints"] == [3, 6, 9] and second["exports"] == [3, 6, 9]
    assert os.stat(marker).st_mtime_ns == written  # steps 1-6 were not trained again
    assert [row["step"] for row in metrics_rows(run)] == list(range(1, 10))

    straight = write_latent_run(tmp_path / "straight", encode=AUGMENTED)
    run_stage(config(9), straight)
    resumed_losses = [row["loss"] for row in metrics_rows(run)]
    assert resumed_losses == pytest.approx([row["loss"] for row in metrics_rows(straight)], rel=1e-5)
    for unet in (layout.EXPORT_UNET, layout.EXPORT_UNET_ONLINE):  # the average resumed exactly too
        assert_same_weights(export_weights(run, 9, unet), export_weights(straight, 9, unet), rtol=1e-5, atol=1e-6)


@pytest.mark.e2e  # a second train stage run end to end, under ZeRO-3: `make test-e2e`
def test_zero_3_keeps_a_partitioned_average_that_resumes_and_matches_zero_2(tmp_path, six_steps):
    """ZeRO-3 partitions the weights and so the average; the math must not change: 3 steps, a
    resume to 6, and the step-6 export equals ZeRO-2's 6 steps in one go."""
    zero2, _, _ = six_steps
    run = write_latent_run(tmp_path / "run", encode=AUGMENTED)
    run_stage(config(3, "train.zero_stage=3"), run)
    assert run.list(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(3)}/ema") == ["rank-0.pt", "rank-1.pt"]
    second = run_stage(config(6, "train.zero_stage=3"), run)
    assert second["steps"] == 6 and second["exports"] == [3, 6]

    averaged, online = flat_weights(run, 6, layout.EXPORT_UNET), flat_weights(run, 6, layout.EXPORT_UNET_ONLINE)
    averaged_2, online_2 = flat_weights(zero2, 6, layout.EXPORT_UNET), flat_weights(zero2, 6, layout.EXPORT_UNET_ONLINE)
    lag = (averaged_2 - online_2).norm()
    assert lag > 0.01  # ~0.25: the average trails the weights
    # ZeRO-2 and ZeRO-3 reduce gradients in another order, and Adam magnifies that in a few weights
    # whose gradients are ~0 (up to ~1e-4 after 6 steps), in the weights and their average alike;
    # the average's lag behind the weights, what the EMA adds, agrees to float precision.
    assert (online - online_2).norm() < 0.01 * lag and (averaged - averaged_2).norm() < 0.01 * lag
    torch.testing.assert_close(averaged - online, averaged_2 - online_2, rtol=0, atol=1e-6)


def test_too_few_shards_fails_before_any_worker_starts(tmp_path):
    run = write_latent_run(tmp_path / "run", shards=1)
    with pytest.raises(TrainStageError, match="1 latent shard.*2 data streams.*num_workers"):
        check_inputs(config(6), run)


def test_missing_encode_output_fails_before_any_worker_starts(tmp_path):
    from pipeline.core.rundir import RunDir

    with pytest.raises(TrainStageError, match="run the encode stage first"):
        check_inputs(config(6), RunDir(tmp_path / "empty"))


def save_builtin_vae(folder, perturb: bool = False) -> str:
    """The builtin tiny VAE saved under another path; with `perturb`, one weight nudged first."""
    vae = models.load_vae("builtin:tiny-vae")
    if perturb:
        with torch.no_grad():
            vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.01
    vae.save_pretrained(folder)
    return str(folder)


def test_latents_of_another_vae_fail_before_any_worker_starts(tmp_path):
    other = save_builtin_vae(tmp_path / "other-vae", perturb=True)
    other_config = EncodeConfig(vae=other)
    records = Encoders.load(other_config).records(other_config)
    run = write_latent_run(tmp_path / "run", encoder_records=records)
    configured = models.weights_sha256(models.load_vae("builtin:tiny-vae"))
    assert records["vae"]["weights_sha256"] != configured

    with pytest.raises(TrainStageError) as error:
        check_inputs(config(6), run)  # what run_stage does on the driver before starting workers
    message = str(error.value)
    for expected in (other, records["vae"]["weights_sha256"], "builtin:tiny-vae", configured, run.path(layout.ENCODE_MANIFEST)):
        assert expected in message
    assert "text_encoder" not in message  # only the VAE differs


def test_the_same_vae_weights_under_another_path_are_accepted(tmp_path):
    run = write_latent_run(tmp_path / "run")  # made by builtin:tiny-vae
    copy = save_builtin_vae(tmp_path / "vae")
    configured = config(6, f'encode.vae = "{copy}"')
    assert configured.encode.vae == copy
    check_inputs(configured, run)


@pytest.mark.parametrize("max_failures", [0, 3, -1])
def test_run_config_passes_train_max_failures_and_keeps_every_checkpoint_folder(tmp_path, max_failures):
    """Only the RunConfig: a real restart of a killed worker is tests/faults/test_kill.py's."""
    from pipeline.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    built = run_config(config(6, f"train.max_failures={max_failures}"), run)
    assert built.failure_config.max_failures == max_failures
    assert built.name == "checkpoints" and built.storage_path == run.path(layout.TRAIN_DIR)
    assert built.checkpoint_config.num_to_keep is None  # retention is ours, after each commit (train.retention)


def test_a_diverged_run_fails_the_stage_naming_the_intact_checkpoint(tmp_path):
    from pipeline.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.write_text(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(3)}/{layout.COMMIT_MARKER}", "t\n")
    run.write_text(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(6)}/{STATE_FILE}", "{}")  # never committed
    worker_summary = {"step": 6, "final_loss": 0.1, "samples_per_s": 1.0, "skipped_nonfinite": 0}
    assert stage_summary(worker_summary, run)["checkpoints"] == [3]

    reason = "the loss was not finite for 20 micro-batches in a row after step 7 (train.max_nonfinite_streak = 20): ..."
    run.write_json(layout.TRAIN_STOPPED, {"step": 7, "reason": reason})
    with pytest.raises(TrainStageError) as error:
        stage_summary(worker_summary, run)
    assert str(error.value) == f"{reason}; the latest checkpoint, step 3, is intact"
