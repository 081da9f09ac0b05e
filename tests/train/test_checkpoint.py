"""Checkpoint cadence, the state a checkpoint adds to DeepSpeed's, and resume guards (train.checkpoint)."""

from __future__ import annotations

import json

import pytest

from train.checkpoint import STATE_FILE, TrainState, is_due, resume
from train.data import BatchPosition


def test_checkpoint_cadence_and_train_state():
    assert [step for step in range(1, 11) if is_due(step, 4, 10)] == [4, 8, 10]
    state = TrainState()
    state.advance(BatchPosition(epoch=2, index=5, samples=[]), skipped=True, step=7)
    assert (state.step, state.epoch, state.batch_index, state.skipped_nonfinite) == (7, 2, 6, 1)


def test_a_long_run_of_non_finite_losses_stops_training():
    state = TrainState()
    for index in range(4):
        state.advance(BatchPosition(epoch=0, index=index, samples=[]), skipped=True, step=0)
        assert state.nonfinite_streak_error(max_streak=5) is None
    state.advance(BatchPosition(epoch=0, index=4, samples=[]), skipped=False, step=1)  # a finite loss resets the streak
    assert state.skipped_in_a_row == 0 and state.skipped_nonfinite == 4
    for index in range(5, 10):
        assert state.nonfinite_streak_error(max_streak=5) is None
        state.advance(BatchPosition(epoch=0, index=index, samples=[]), skipped=True, step=1)
    error = state.nonfinite_streak_error(max_streak=5)
    assert "5 micro-batches in a row after step 1" in error and "train.max_nonfinite_streak = 5" in error


def test_resuming_with_another_number_of_workers_is_refused(tmp_path, monkeypatch):
    import ray.train

    state = {"step": 6, "epoch": 0, "batch_index": 6, "skipped_nonfinite": 0, "skipped_in_a_row": 0, "world_size": 4}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(tmp_path))
    with pytest.raises(RuntimeError, match="written by 4 workers.*num_workers = 4"):
        resume(engine=None)
