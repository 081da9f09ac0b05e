"""`train.profile`: where a training step's time goes, phase by phase, on every rank.

The loop times its own phases with `perf_counter`: reading and collating the batch, the step's
draws (caption dropout, noise, timesteps), the forward with the loss, the loss check (a
collective: it also waits for the slowest rank), the moving average, logging, export and
checkpoint. DeepSpeed's engine timers (`wall_clock_breakdown`) split the rest: backward
(autograd), the gradient reduction that ends it, and the optimizer step (under ZeRO 1-2 it ends
with the all-gather of the updated partitions). On a CPU these timers do not synchronize, so the
cost is a few clock reads per step.

Each rank writes `RUN/train/profile/rank-N.json` at every checkpoint and at the end, and rank 0
logs the table once training is done. The first `WARMUP` steps of a session are left out of the
per-step figures (allocator and thread pools warming up); the seconds from the worker function's
start to its first step (config, encode manifest, UNet, DeepSpeed engine, resume) are reported apart.
"""

from __future__ import annotations

import contextlib
import json
import time

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from train import distributed

WARMUP = 2
_UNTIMED = contextlib.nullcontext()  # reusable: it holds no state
# DeepSpeed's global timer names (deepspeed.utils.timer) and the row each becomes; the forward is
# timed here, with the loss.
ENGINE_TIMERS = {
    "bwd_inner": "backward",
    "bwd_allreduce": "gradient reduce",
    "step": "optimizer step",
}
# The rows in step order; "other" is the step's wall clock that no timer covers (Python between them).
# Export and checkpoint come every train.checkpoint_every steps: per step, their total over the steps timed.
ROWS = (
    "data",
    "draws",
    "forward",
    "loss check",
    "backward",
    "gradient reduce",
    "optimizer step",
    "ema",
    "log",
    "export",
    "checkpoint",
)


class StepProfile:
    """One rank's phase totals; every method is a no-op when profiling is off."""

    def __init__(self, enabled: bool, run: RunDir | None = None, start_step: int = 0):
        self.enabled, self.run = enabled, run
        self.start_step = start_step
        self.totals = dict.fromkeys((*ROWS, "other"), 0.0)
        self.steps = 0  # timed steps (after the warm-up)
        self.seen = 0
        self.wall = 0.0
        self.setup_seconds = 0.0
        self._step_started: float | None = None

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Times the block as row `name`; off, a shared no-op (nothing per step on the hot path)."""
        return self._timed(name) if self.enabled else _UNTIMED

    @contextlib.contextmanager
    def _timed(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.seen >= WARMUP:
                self.totals[name] += time.perf_counter() - started

    def step_started(self) -> None:
        """At each micro-batch; the step's clock starts at the first of its accumulation window."""
        if self.enabled and self._step_started is None:
            self._step_started = time.perf_counter()

    def step_done(self, engine) -> None:
        """At the end of a step (its checkpoint included): add the engine's timers and the wall clock."""
        if not self.enabled or self._step_started is None:
            return
        # Milliseconds of this step (DeepSpeed resets them at each step); PlainEngine has none.
        timed = getattr(engine, "get_wall_clock_timers", dict)() or {}
        if self.seen >= WARMUP:
            for timer, row in ENGINE_TIMERS.items():
                self.totals[row] += timed.get(timer, 0.0) / 1000.0
            self.wall += time.perf_counter() - self._step_started
            self.steps += 1
        self.seen += 1
        self._step_started = None

    def table(self) -> dict:
        """Milliseconds per step and share of the step's wall clock, row by row."""
        steps = max(self.steps, 1)
        covered = sum(self.totals[row] for row in ROWS)
        totals = {**self.totals, "other": max(self.wall - covered, 0.0)}
        wall = self.wall or 1.0  # nothing timed yet: every share is 0
        rows = {
            row: {"ms_per_step": round(1000 * totals[row] / steps, 3), "share": round(totals[row] / wall, 4)}
            for row in (*ROWS, "other")
        }
        return {
            "rank": distributed.rank(),
            "world_size": distributed.world_size(),
            "steps_timed": self.steps,
            "warmup_steps_left_out": min(self.seen, WARMUP),
            "from_step": self.start_step,
            "ms_per_step": round(1000 * self.wall / steps, 3),
            "setup_seconds": round(self.setup_seconds, 2),
            "rows": rows,
        }

    def first_step(self, entered: float) -> None:
        """Just before the first step; `entered`: the worker function's start, on `time.perf_counter`."""
        self.setup_seconds = time.perf_counter() - entered

    def write(self) -> None:
        if self.enabled and self.run is not None:
            self.run.write_text(f"{layout.TRAIN_PROFILE}/rank-{distributed.rank()}.json", json.dumps(self.table(), indent=1))

    def report(self) -> None:
        """Write this rank's table; rank 0 also logs it."""
        if not self.enabled:
            return
        self.write()
        for line in format_table(self.table()).splitlines():  # one log line each: the console shows only those
            distributed.log(line)


def format_table(table: dict) -> str:
    lines = [
        f"profile of rank {table['rank']} of {table['world_size']}: {table['steps_timed']} steps timed after "
        f"{table['warmup_steps_left_out']} of warm-up, {table['ms_per_step']:.1f} ms per step; "
        f"{table['setup_seconds']:.1f} s of set-up before the first",
        f"{'phase':<16}{'ms/step':>10}{'share':>8}",
    ]
    for row, figures in table["rows"].items():
        lines.append(f"{row:<16}{figures['ms_per_step']:>10.1f}{100 * figures['share']:>7.1f}%")
    return "\n".join(lines)
