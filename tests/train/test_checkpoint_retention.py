"""Checkpoint retention is ours (train.retention): rank 0 prunes only after it commits, never the
newest committed checkpoint; Ray Train keeps every folder (tests/train/test_stage.py checks its RunConfig)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.core import faults, layout
from pipeline.core.rundir import RunDir
from train.checkpoint import STATE_FILE, TrainState, save_checkpoint
from train.retention import prune_checkpoints, to_prune


def folder(step: int) -> str:
    return f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(step)}"


def checkpoint(run: RunDir, step: int, committed: bool = True) -> None:
    run.write_json(f"{folder(step)}/{STATE_FILE}", {"step": step, "world_size": 1})
    run.write_text(f"{folder(step)}/deepspeed/mp_rank_00_model_states.pt", "weights")
    if committed:
        run.write_text(f"{folder(step)}/{layout.COMMIT_MARKER}", "t\n")


def steps_left(run: RunDir) -> list[int]:
    return [layout.parse_step(name) for name in run.list(layout.TRAIN_CHECKPOINTS) if layout.parse_step(name) is not None]


def test_older_committed_and_leftover_uncommitted_folders_are_pruned_never_the_newest_committed():
    names = [layout.step_name(step) for step in (2, 4, 6, 8, 10)] + ["checkpoint_manager_snapshot.json"]
    # committed 2, 6, 8; 4 a killed save's leftover, 10 newer than the newest committed: left alone
    assert to_prune(names, committed=[2, 6, 8], keep=2) == [layout.step_name(2), layout.step_name(4)]
    assert to_prune(names, committed=[2, 6, 8], keep=1) == [layout.step_name(step) for step in (2, 4, 6)]
    assert to_prune(names, committed=[2, 6, 8], keep=5) == [layout.step_name(4)]
    assert to_prune(names, committed=[8], keep=0) == [layout.step_name(step) for step in (2, 4, 6)]  # 8 stays
    assert to_prune(names, committed=[], keep=1) == []  # no committed checkpoint: nothing is touched


def test_prune_removes_the_folders_and_keeps_the_newest_committed(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (3, 6, 9):
        checkpoint(run, step)
    checkpoint(run, 12, committed=False)
    assert prune_checkpoints(run, keep=1) == [3, 6]
    assert steps_left(run) == [9, 12] and run.committed_steps(layout.TRAIN_CHECKPOINTS) == [9]


class Killed(Exception):
    """Stands for the SIGKILL a fault point sends."""


class FakeEngine:
    def save_checkpoint(self, folder: str, tag: str, exclude_frozen_parameters: bool = False) -> None:
        Path(folder, tag).mkdir(parents=True)
        Path(folder, tag, "mp_rank_00_model_states.pt").write_text("weights")


@pytest.fixture
def reported(monkeypatch, tmp_path):
    """ray.train.report without a Ray session: the checkpoint lands in RUN/train/checkpoints/NAME,
    as Ray Train's upload puts it."""
    import ray.train

    run = RunDir(tmp_path / "run")

    def report(metrics, checkpoint=None, checkpoint_dir_name=None):
        shutil.copytree(checkpoint.path, run.path(f"{layout.TRAIN_CHECKPOINTS}/{checkpoint_dir_name}"), dirs_exist_ok=True)

    monkeypatch.setattr(ray.train, "report", report)
    return run


def test_save_checkpoint_prunes_only_after_the_commit(reported, monkeypatch):
    run = reported
    save_checkpoint(FakeEngine(), run, TrainState(step=4), {}, keep=1)
    assert run.committed_steps(layout.TRAIN_CHECKPOINTS) == [4]

    def inject(point, **where):
        if point == "checkpoint-commit" and where.get("step") == 8:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(faults, "inject", inject)
        with pytest.raises(Killed):  # rank 0 dies with step 8 uploaded, before its COMMITTED
            save_checkpoint(FakeEngine(), run, TrainState(step=8), {}, keep=1)
    assert steps_left(run) == [4, 8] and run.committed_steps(layout.TRAIN_CHECKPOINTS) == [4]  # nothing pruned

    save_checkpoint(FakeEngine(), run, TrainState(step=8), {}, keep=1)  # the rerun gets there
    assert steps_left(run) == [8] and run.committed_steps(layout.TRAIN_CHECKPOINTS) == [8]


def test_the_record_the_train_stage_drops_is_the_one_ray_train_writes():
    """Ray Train refuses to start on a record naming a folder we pruned: run_stage removes it first."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from train.stage import RAY_CHECKPOINTS_RECORD

    assert RAY_CHECKPOINTS_RECORD == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
