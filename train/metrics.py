"""Training metrics: a window that averages between log lines, and rank 0's record of them.

Rank 0 keeps every logged row and rewrites `RUN/train/metrics.jsonl` (one JSON object per
line: step, loss, lr, grad_norm, samples_per_s) and, with "tensorboard" in `train.trackers`,
uploads its TensorBoard event files to `RUN/train/logs` at each checkpoint and at the end. A
resumed run keeps the rows up to the step it resumed from and tells TensorBoard to drop anything
logged after it. The other trackers (`pipeline.core.trackers`: MLflow, W&B) get the config once,
each row, and the watcher's validations as they appear.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.rundir import RunDir
from pipeline.core.trackers import Trackers, flatten
from train import distributed


class LogWindow:
    """Losses and samples since the last log line; every rank keeps one."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def row(self, step: int, engine) -> dict:
        """The log row for `step`; collective (the loss and throughput are summed over ranks)."""
        finite = [loss for loss in self.losses if loss == loss]
        local_loss = sum(finite) / len(finite) if finite else float("nan")
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        grad_norm = engine.get_global_grad_norm()
        loss = distributed.mean_across_ranks(local_loss)
        row = {
            "step": step,
            "loss": loss if math.isfinite(loss) else None,
            "lr": float(engine.get_lr()[0]),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": distributed.mean_across_ranks(self.samples / elapsed) * distributed.world_size(),
        }
        self.restart()
        return row


class MetricsLog:
    """Rank 0's logged rows, metrics.jsonl and TensorBoard events (a no-op on other ranks)."""

    def __init__(
        self, run: RunDir, start_step: int, enabled: bool, config: PipelineConfig | None = None, counts: dict | None = None
    ):
        self.run, self.enabled = run, enabled
        self.rows: list[dict] = []
        self.session_rows: list[dict] = []
        self.writer = None
        self.trackers = Trackers([])
        if not enabled:
            return
        if start_step and run.exists(layout.TRAIN_METRICS):
            previous = [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines() if line.strip()]
            self.rows = [row for row in previous if row["step"] <= start_step]
        train = config.train if config is not None else None
        if train is None or "tensorboard" in train.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.local_dir = tempfile.mkdtemp(prefix="train-logs-")
            self.writer = SummaryWriter(self.local_dir, purge_step=start_step + 1 if start_step else None)
        if train is not None:
            self.trackers = Trackers.of(train, run)
            self.trackers.params({**flatten(config.model_dump(mode="json")), **flatten(counts or {}, "parameters.")})

    def add(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self.session_rows.append(row)
        values = {f"train/{key}": value for key, value in row.items() if key != "step" and value is not None}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
        self.trackers.metrics(values, row["step"])
        self.trackers.new_validations(self.run)  # what the watcher validated since
        distributed.log(
            f"step {row['step']}  loss {_format(row['loss'])}  lr {row['lr']:.2e}  "
            f"grad_norm {_format(row['grad_norm'])}  {row['samples_per_s']:.1f} samples/s"
        )

    def publish(self) -> None:
        """(Re)write metrics.jsonl and upload the event files (each one atomically)."""
        if not self.enabled:
            return
        self.run.write_text(layout.TRAIN_METRICS, "".join(json.dumps(row) + "\n" for row in self.rows))
        if self.writer is None:
            return
        self.writer.flush()
        for name in sorted(os.listdir(self.local_dir)):
            with open(os.path.join(self.local_dir, name), "rb") as handle:
                self.run.write_bytes(f"{layout.TRAIN_LOGS}/{name}", handle.read())

    def close(self) -> None:
        if not self.enabled:
            return
        self.publish()
        self.trackers.new_validations(self.run)
        self.trackers.close()
        if self.writer is not None:
            self.writer.close()
            shutil.rmtree(self.local_dir, ignore_errors=True)

    @property
    def final_loss(self) -> float | None:
        losses = [row["loss"] for row in self.rows if row["loss"] is not None]
        return losses[-1] if losses else None

    @property
    def samples_per_s(self) -> float | None:
        """Mean throughput of this session's log windows (None before the first)."""
        values = [row["samples_per_s"] for row in self.session_rows]
        return sum(values) / len(values) if values else None


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
