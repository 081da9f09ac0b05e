"""Phases of a multi-resolution schedule (train.phases): when a checkpoint starts a new one, and what it records."""

from __future__ import annotations

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from train.checkpoint import STATE_FILE, TrainState
from train.phases import begin_phase, check_new_phase


def test_a_checkpoint_of_another_resolution_starts_a_new_phase_at_the_next_epoch():
    state = TrainState()
    assert not begin_phase(state, 64)  # a fresh run: its first phase
    assert state.phases == [{"resolution": 64, "start_step": 0}]
    state.step, state.epoch, state.taken = 400, 3, 17
    assert not begin_phase(state, 64)  # a rerun at the same resolution resumes mid-epoch
    assert (state.epoch, state.taken, len(state.phases)) == (3, 17, 1)
    assert begin_phase(state, 128)
    assert state.phases == [{"resolution": 64, "start_step": 0}, {"resolution": 128, "start_step": 400}]
    assert (state.step, state.epoch, state.taken) == (400, 4, 0)  # steps go on; the data order starts afresh
    state.epoch, state.taken = 7, 0
    assert begin_phase(state, 256) and (state.epoch, state.taken) == (7, 0)  # epoch 7 had not begun
    assert [phase["start_step"] for phase in state.phases] == [0, 400, 400]


def test_a_checkpoint_older_than_phases_counts_as_one_phase_at_the_current_resolution():
    state = TrainState(step=500, epoch=2, taken=3)
    assert not begin_phase(state, 64)
    assert state.phases == [{"resolution": 64, "start_step": 0}] and (state.epoch, state.taken) == (2, 3)


def test_a_new_phase_without_steps_left_is_refused_naming_max_steps(tmp_path):
    run = RunDir(tmp_path)
    run.write_json(layout.ENCODE_MANIFEST, {"resolution": 128})
    assert check_new_phase(run, max_steps=8) is None  # no checkpoint yet
    checkpoint = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(8)}"
    run.write_json(f"{checkpoint}/{STATE_FILE}", {"step": 8, "phases": [{"resolution": 64, "start_step": 0}]})
    run.write_text(f"{checkpoint}/{layout.COMMIT_MARKER}", "t\n")
    problem = check_new_phase(run, max_steps=8)
    assert "128 px" in problem and "step 8" in problem and "train.max_steps = 8" in problem
    assert check_new_phase(run, max_steps=12) is None
    run.write_json(layout.ENCODE_MANIFEST, {"resolution": 64})
    assert check_new_phase(run, max_steps=8) is None  # the same phase: a finished run, nothing to refuse
