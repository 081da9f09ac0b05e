"""Checkpoint cadence, the state a checkpoint adds to DeepSpeed's, and resume guards (train.checkpoint)."""

from __future__ import annotations

import pytest

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from train.checkpoint import STATE_FILE, TrainState, is_due, rank_files, resume
from train.order import BatchPosition


def test_checkpoint_cadence_and_train_state():
    assert [step for step in range(1, 11) if is_due(step, 4, 10)] == [4, 8, 10]
    state = TrainState()
    state.advance(BatchPosition(epoch=2, taken=40, next_taken=48, samples=[]), skipped=True, step=7)
    assert (state.step, state.epoch, state.taken, state.skipped_nonfinite) == (7, 2, 48, 1)


def test_a_long_run_of_non_finite_losses_stops_training():
    state = TrainState()
    for index in range(4):
        state.advance(BatchPosition(epoch=0, taken=index, next_taken=index + 1, samples=[]), skipped=True, step=0)
        assert state.nonfinite_streak_error(max_streak=5) is None
    state.advance(
        BatchPosition(epoch=0, taken=4, next_taken=5, samples=[]), skipped=False, step=1
    )  # a finite loss resets the streak
    assert state.skipped_in_a_row == 0 and state.skipped_nonfinite == 4
    for index in range(5, 10):
        assert state.nonfinite_streak_error(max_streak=5) is None
        state.advance(BatchPosition(epoch=0, taken=index, next_taken=index + 1, samples=[]), skipped=True, step=1)
    error = state.nonfinite_streak_error(max_streak=5)
    assert "5 micro-batches in a row after step 1" in error and "train.max_nonfinite_streak = 5" in error


def test_another_number_of_workers_needs_the_universal_form(tmp_path):
    run = RunDir(str(tmp_path))
    state = {"step": 6, "epoch": 0, "taken": 6, "streams": 4, "skipped_nonfinite": 0, "skipped_in_a_row": 0, "world_size": 4}
    run.write_json(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(6)}/{STATE_FILE}", state)
    run.write_text(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(6)}/{layout.COMMIT_MARKER}", "t\n")
    with pytest.raises(RuntimeError, match="written by 4 workers and has no universal form for 1"):
        resume(engine=None, run=run)


def test_only_committed_checkpoints_are_resumed_from(tmp_path):
    """A folder without COMMITTED (even with DeepSpeed's `latest` and a train state in it) is never picked."""
    run = RunDir(str(tmp_path))
    assert resume(engine=None, run=run) == TrainState()  # nothing saved yet: a fresh start
    half = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(8)}"
    run.write_json(f"{half}/{STATE_FILE}", {"step": 8, "world_size": 1})
    run.write_text(f"{half}/deepspeed/latest", "deepspeed")
    assert resume(engine=None, run=run) == TrainState()
    run.write_json(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(4)}/{STATE_FILE}", {"step": 4, "world_size": 3})
    run.write_text(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(4)}/{layout.COMMIT_MARKER}", "t\n")
    with pytest.raises(RuntimeError, match="step-0000004 was written by 3 workers"):  # step 4 it is, not 8
        resume(engine=None, run=run)


def test_a_rank_copies_only_its_part_of_a_checkpoint():
    names = [
        "train_state.json",
        "deepspeed/mp_rank_00_model_states.pt",
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_10_mp_rank_00_model_states.pt",
        "ema/whole.pt",
        "ema/rank-0.pt",
        "ema/rank-1.pt",
        "deepspeed_universal/zero/conv_in.weight/fp32.pt",
        "deepspeed_universal/mp_rank_00_model_states.pt",
    ]
    same = [name for name in names if rank_files(1, saved_world=2)(name)]
    assert same == [
        "train_state.json",
        "deepspeed/mp_rank_00_model_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ema/whole.pt",
        "ema/rank-1.pt",
    ]
    other = [name for name in names if rank_files(0, saved_world=None)(name)]
    assert other == [
        "train_state.json",
        "ema/whole.pt",
        "ema/rank-0.pt",
        "ema/rank-1.pt",
        "deepspeed_universal/zero/conv_in.weight/fp32.pt",
        "deepspeed_universal/mp_rank_00_model_states.pt",
    ]


def test_a_committed_export_is_never_rewritten(tmp_path):
    """A rerun that reaches a step whose export is committed (killed between export and checkpoint)
    keeps every file of it as it is, even with other weights in hand."""
    from types import SimpleNamespace

    import torch

    from pipeline.core.config import load_config
    from train.checkpoint import export_model
    from train.unet import build_unet

    config = load_config("tiny").train
    unet = build_unet(config.unet, cross_attention_dim=32, sample_size=8)
    run = RunDir(tmp_path / "run")
    export_model(SimpleNamespace(module=unet), run, config, step=4)
    export = tmp_path / "run" / layout.TRAIN_EXPORT / layout.step_name(4)
    files = sorted(path for path in export.rglob("*") if path.is_file())
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in files}

    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1.0)
    export_model(SimpleNamespace(module=unet), run, config, step=4)
    assert sorted(path for path in export.rglob("*") if path.is_file()) == files
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in files} == before

    export_model(SimpleNamespace(module=unet), run, config, step=8)  # a step not exported yet is
    assert run.committed_steps(layout.TRAIN_EXPORT) == [4, 8]
