"""train.profile: the phases of a step, timed on a clock the test drives (the Ray run's profile: tests/e2e)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_step import make_batch, make_engine, scheduler

from pipeline.core.rundir import RunDir
from train import profile
from train.profile import ROWS, WARMUP, StepProfile, format_table
from train.step import train_step


class Clock:
    """perf_counter for train.profile: advances only when the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedEngine:
    """What DeepSpeed's engine gives train.profile: the last step's timers, in milliseconds."""

    def get_wall_clock_timers(self) -> dict:
        return {"bwd_inner": 30.0, "bwd_allreduce": 5.0, "step": 4.0, "fwd": 99.0}


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(profile.time, "perf_counter", clock)
    return clock


def one_step(timer: StepProfile, clock: Clock, export_seconds: float = 0.0) -> None:
    timer.step_started()
    for name, seconds in (("data", 0.002), ("draws", 0.001), ("forward", 0.010), ("loss check", 0.0005)):
        with timer.phase(name):
            clock.now += seconds
    clock.now += 0.039  # the engine's backward, reduce and step, which its own timers report
    with timer.phase("ema"):
        clock.now += 0.003
    clock.now += 0.0015  # Python between the phases: "other"
    if export_seconds:
        with timer.phase("export"):
            clock.now += export_seconds
    timer.step_done(TimedEngine())


def test_phases_add_up_to_the_step_and_the_warmup_is_left_out(clock, tmp_path):
    timer = StepProfile(True, RunDir(str(tmp_path)), start_step=100)
    for _ in range(WARMUP):
        one_step(timer, clock, export_seconds=5.0)  # left out, export included
    for index in range(4):
        one_step(timer, clock, export_seconds=0.2 if index == 3 else 0.0)
    table = timer.table()
    rows = table["rows"]
    assert table["steps_timed"] == 4 and table["warmup_steps_left_out"] == WARMUP and table["from_step"] == 100
    expected = {"data": 2, "draws": 1, "forward": 10, "loss check": 0.5, "backward": 30, "gradient reduce": 5}
    expected |= {"optimizer step": 4, "ema": 3, "log": 0, "other": 1.5, "export": 50, "checkpoint": 0}
    assert {row: pytest.approx(figures["ms_per_step"], abs=1e-6) for row, figures in rows.items()} == expected
    # The steps' wall clock (57 ms) with the export spread over them; the engine's own forward timer is not used.
    assert table["ms_per_step"] == pytest.approx(107.0)
    assert sum(figures["share"] for figures in rows.values()) == pytest.approx(1.0, abs=1e-3)
    assert rows["export"]["share"] == pytest.approx(50 / 107, abs=1e-4)
    assert "gradient reduce" in format_table(table) and "4 steps timed" in format_table(table)

    timer.write()
    assert RunDir(str(tmp_path)).read_json("train/profile/rank-0.json")["rows"] == rows


def test_accumulation_micro_batches_count_in_one_step(clock):
    timer = StepProfile(True)
    for _ in range(WARMUP + 2):
        for _micro in range(3):  # three micro-batches, then the optimizer step
            timer.step_started()
            with timer.phase("forward"):
                clock.now += 0.010
        timer.step_done(TimedEngine())
    table = timer.table()
    assert table["steps_timed"] == 2
    assert table["rows"]["forward"]["ms_per_step"] == pytest.approx(30.0)
    assert table["ms_per_step"] == pytest.approx(30.0)


def test_off_records_nothing_and_writes_nothing(clock, tmp_path):
    timer = StepProfile(False, RunDir(str(tmp_path)))
    for _ in range(WARMUP + 3):
        one_step(timer, clock)
    timer.report()
    assert timer.steps == 0 and not (tmp_path / "train").exists()


def test_train_step_times_its_parts_in_order():
    calls = []

    @contextlib.contextmanager
    def phase(name):
        calls.append(name)
        yield

    engine = make_engine()
    generator = torch.Generator().manual_seed(0)
    empty = torch.zeros((77, 64))
    result = train_step(engine, make_batch(), scheduler(), empty, 0.1, generator, phase=phase)
    assert not result["skipped"] and calls == ["draws", "forward", "loss check"]
    assert set(calls) < set(ROWS)
