"""Validation beside training (`sample.watch`): exports are validated while the train stage runs.

A thread in the driver looks at `train/export/` every `sample.watch_interval_s` and, when a
committed export (its COMMITTED marker written last) is not validated yet, has one Ray actor
validate the newest such export with the sample stage's own `Validator`; older ones are left
to the sample stage, so the watcher keeps up with training instead of falling behind it. The
actor is started with the watcher and loads the VAE, text encoder and metric models once,
while training starts up. It writes the grids and returns the entry; the thread, the only
writer of validation.json while training runs, records it (flagged `during_training`). The
runner stops and joins the watcher, letting a validation in flight finish, before the sample
stage starts, so the two never write concurrently, and the stage then validates only what is
left. A failed validation is logged and remembered, never raised into training; the sample
stage retries that export and reports the error if it persists.

The actor reserves `sample.watch_cpus` and `sample.watch_gpus`; the default 0 CPUs lets it
run while training holds every CPU Ray has (the 2-core demo), with one torch thread. Before
training starts, the runner asks `crowded_out` whether that reservation fits beside training's
on the cluster; where it does not, the actor would wait for resources training never frees, or
take one a training worker needs (64 one-GPU workers on 64 GPUs wait forever beside a one-GPU
watcher), so the watcher is not started and the sample stage validates every export afterwards.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any

from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.log import get_logger
from pipeline.core.resources import training_reservation
from pipeline.core.rundir import RunDir

logger = get_logger("watch")


def crowded_out(config: PipelineConfig, cluster: dict[str, float]) -> str | None:
    """Why the watcher's reservation (sample.watch_cpus / watch_gpus) does not fit beside training's on a cluster
    of these totals (`ray.cluster_resources()`), naming the numbers and keys; None where it fits. Whether
    training itself fits is not judged here."""
    sample, train = config.sample, config.train
    asks = [("GPU", sample.watch_gpus, "sample.watch_gpus"), ("CPU", sample.watch_cpus, "sample.watch_cpus")]
    asks = [ask for ask in asks if ask[1] > 0]
    if not asks:  # a watcher that reserves nothing always runs, sharing what training holds
        return None
    training = training_reservation(config)
    workers = {
        "GPU": f"train.num_workers = {train.num_workers}, one GPU each" if train.use_gpu else "train.use_gpu = false",
        "CPU": f"train.num_workers = {train.num_workers} x train.cpus_per_worker = {train.cpus_per_worker:g}",
    }
    reasons = []
    for resource, asked, key in asks:
        total, taken = float(cluster.get(resource, 0.0)), training.get(resource, 0.0)
        if taken + asked <= total + 1e-9:  # fractional CPUs add up with rounding errors
            continue
        trainer = taken - (train.num_workers * (train.cpus_per_worker if resource == "CPU" else float(train.use_gpu)))
        how = workers[resource] + (f", plus {trainer:g} for Ray Train's trainer" if trainer > 1e-9 else "")
        reasons.append(f"training takes {taken:g} of {total:g} {resource}s ({how}) and the watcher asks for {asked:g} ({key})")
    return "; ".join(reasons) or None


class Validating:
    """What the watcher's actor runs (or the watcher itself, without Ray): one Validator, loaded on first use."""

    def __init__(self, config_data: dict[str, Any], run_url: str, threads: int | None = None):
        self.config, self.run = PipelineConfig.model_validate(config_data), RunDir(run_url)
        self.validator = None
        if threads:
            import torch

            torch.set_num_threads(threads)

    def load(self) -> None:
        from sample.validate.stage import Validator

        if self.validator is None:
            self.validator = Validator.load(self.config, self.run)

    def warm(self) -> str | None:
        """Load the models before the first export appears; the error, if any, is retried at the first export."""
        try:
            self.load()
        except Exception as error:  # noqa: BLE001 - reported, retried at the first export
            return f"{type(error).__name__}: {error}"
        return None

    def validate(self, step: int) -> dict[str, Any]:
        self.load()
        return self.validator.validate(step)


class Watcher:
    def __init__(self, config: PipelineConfig, run: RunDir, remote: bool = True):
        self.config, self.run, self.remote = config, run, remote
        self.validated: list[int] = []
        self.errors: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sample-watcher", daemon=True)
        self._worker = None  # a Ray actor handle, or a local Validating
        self._warm = None  # the actor's first call: done once it holds its resources and models

    def start(self) -> Watcher:
        # Imported here, in the caller's thread: two threads resolving diffusers' and transformers' lazy
        # imports at once can fail ("cannot import name 'DDPMScheduler' from 'diffusers'").
        import sample.clip_score
        import sample.fid
        import sample.validate.stage  # noqa: F401

        logger.info(f"validating exports beside training (every {self.config.sample.watch_interval_s:g} s)")
        if self.run.exists(layout.ENCODE_MANIFEST):  # load the models while training starts up
            self._start_worker()
        self._thread.start()
        return self

    def _start_worker(self) -> None:
        import ray

        sample = self.config.sample
        data = self.config.model_dump(mode="json")
        if self.remote and ray.is_initialized():  # Ray is up in `pipeline run`; tests may go without
            actor = ray.remote(Validating).options(num_cpus=sample.watch_cpus, num_gpus=sample.watch_gpus)
            self._worker = actor.remote(data, self.run.url, max(1, math.floor(sample.watch_cpus)))
            self._warm = self._worker.warm.remote()
        else:
            self._worker = Validating(data, self.run.url)

    def stop(self) -> dict[str, Any]:
        """Stop polling, wait for a validation in flight, and say what was done."""
        self._stop.set()
        self._thread.join()
        if not isinstance(self._worker, Validating) and self._worker is not None:
            import ray

            ray.kill(self._worker)
        return {"validated": list(self.validated), "errors": {str(step): error for step, error in self.errors.items()}}

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - never let the watcher take training down
                logger.warning(f"poll failed:\n{traceback.format_exc(limit=4)}")
            if self._stop.wait(self.config.sample.watch_interval_s):
                return

    def poll(self) -> int | None:
        """Validate the newest committed export not yet validated (or failed); its step, or None."""
        from sample.validate.stage import has_conditions, pending_steps, read_validation, record

        validation = read_validation(self.run)
        _, todo = pending_steps(self.config.sample, self.run, validation, self.config.train.conditioning)
        todo = [step for step in todo if step not in self.errors]
        if not todo or not has_conditions(self.config) or self._stop.is_set():
            return None
        step = todo[-1]
        started = time.monotonic()
        try:
            entry = self._validate(step)
        except Exception as error:  # noqa: BLE001 - recorded; the sample stage retries it
            self.errors[step] = f"{type(error).__name__}: {error}"[:2000]
            logger.warning(f"validating step {step} failed (the sample stage retries it): {self.errors[step]}")
            return None
        record(self.run, validation, {**entry, "during_training": True})
        self.validated.append(step)
        logger.info(f"step {step} validated beside training in {time.monotonic() - started:.1f} s")
        return step

    def _validate(self, step: int) -> dict[str, Any]:
        if self._worker is None:
            self._start_worker()
        if isinstance(self._worker, Validating):
            return self._worker.validate(step)
        import ray

        call = self._worker.validate.remote(step)
        while not ray.wait([call], timeout=1.0)[0]:
            # Training is over and the actor never got going (no free resources?): leave it to the stage.
            if self._stop.is_set() and not ray.wait([self._warm], timeout=0)[0]:
                raise TimeoutError(
                    "the watcher's actor did not start before training ended "
                    "(are sample.watch_cpus / sample.watch_gpus available beside training?)"
                )
        return ray.get(call)
