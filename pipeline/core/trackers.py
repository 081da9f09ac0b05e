"""Experiment trackers (`train.trackers`): TensorBoard files, MLflow and Weights & Biases.

One tracker run per training run, its id kept in `RUN/train/trackers.json`, so a resumed run goes on
in the same tracker run (and `--restart train` starts a new one). One writer at a time: during
training, rank 0 of the train stage logs the resolved config as parameters, every logged step's
metrics and, as the watcher beside training validates exports, each validation's figures per
guidance scale and its image grids (read back from sample/validation.json at each log step); after
training the sample stage logs the validations it adds. `trackers.json` also lists the validations
already logged (step and time), so none is logged twice.

Where a tracker is and who may write to it come from the environment, never from config.toml:
MLflow reads MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN,
MLFLOW_EXPERIMENT_NAME), W&B reads WANDB_API_KEY, WANDB_MODE (offline, online), WANDB_PROJECT and
WANDB_DIR. A tracker that fails (its server down, a bad key) logs one warning and is off for the
rest of the process: it never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core import layout
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("trackers")
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the module it needs (tensorboard is a dependency)
PARAM_CHUNK = 100  # MLflow takes at most 100 params in one batch
# What the trackers read from the environment and is no secret: passed on to the Ray workers from where
# `pipeline` runs. Keys and passwords (WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN) are not:
# a Ray runtime environment is readable by anyone holding the cluster's token. A local Ray inherits them
# from the driver; on a cluster they belong on every node (on Kubernetes, from a secret).
ENV_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_EXPERIMENT_NAME",
    "WANDB_BASE_URL",
    "WANDB_ENTITY",
    "WANDB_PROJECT",
    "WANDB_MODE",
    "WANDB_DIR",
)


def environment() -> dict[str, str]:
    """The trackers' variables set here, for the Ray workers' environment (the train stage's rank 0 logs)."""
    return {name: os.environ[name] for name in ENV_VARS if name in os.environ}


def unusable(names: Iterable[str]) -> str | None:
    """Why the trackers named cannot log from here (a package missing, MLflow without a URI); None if they can."""
    missing = [name for name in names if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        return (
            f"train.trackers names {', '.join(missing)}, not installed here: pip install 't2i-pipeline[trackers]' "
            f"(or {' '.join(missing)}), or leave {'it' if len(missing) == 1 else 'them'} out of train.trackers"
        )
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        return (
            "train.trackers names mlflow, but MLFLOW_TRACKING_URI is not set: set it where `pipeline` runs to the "
            "tracking server (e.g. http://127.0.0.1:5000), which the workers are given too"
        )
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Trackers:
    """The configured trackers of one process, each guarded: the first error turns it off with one warning."""

    def __init__(self, trackers: list[Any]):
        self.active = trackers
        self.warned = False  # of the validations' bookkeeping (new_validations): once per process

    @classmethod
    def of(cls, train, run: RunDir) -> Trackers:
        """The trackers `train.trackers` names, opened for `run` (named after its folder)."""
        return cls.open(train.trackers, run, os.path.basename(run.root.rstrip("/")), train.tracker_project)

    @classmethod
    def open(cls, names: list[str], run: RunDir, run_name: str, project: str) -> Trackers:
        """Open (or, from RUN/train/trackers.json, reopen) one tracker run per name. "tensorboard" takes the validations
        only: train.metrics writes the training scalars' event files itself."""
        record = run.read_json(layout.TRACKERS, default={"ids": {}, "validation_logged": []})
        opened = []
        for name in names:
            try:
                tracker = _KINDS[name](run, run_name, project, record["ids"].get(name))
            except Exception as error:  # noqa: BLE001 (any failure of a tracker is a warning, not a failed run)
                _warn(name, "could not be opened", error)
                continue
            opened.append(tracker)
            if tracker.id is not None and record["ids"].get(name) != tracker.id:
                record["ids"][name] = tracker.id
                run.write_json(layout.TRACKERS, record)
        return cls(opened)

    def params(self, params: dict[str, Any]) -> None:
        self._each("params", params)

    def metrics(self, values: dict[str, float], step: int) -> None:
        values = {key: float(value) for key, value in values.items() if isinstance(value, (int, float))}
        if values:
            self._each("metrics", values, step)

    def new_validations(self, run: RunDir) -> list[int]:
        """Log the entries of sample/validation.json no tracker run has had yet; their steps. Reading them may
        fail (storage, a grid removed): one warning per process, the next call tries again, training goes on."""
        if not self.active:
            return []
        try:
            return self._new_validations(run)
        except Exception as error:  # noqa: BLE001 (the trackers' bookkeeping never stops training either)
            if not self.warned:
                logger.warning(f"could not log the new validations to the trackers ({type(error).__name__}: {error})")
                self.warned = True
            return []

    def _new_validations(self, run: RunDir) -> list[int]:
        entries = unlogged(run)
        for entry in entries:
            self.validation(entry, run)
        if entries:
            record = run.read_json(layout.TRACKERS, default={"ids": {}, "validation_logged": []})
            record["validation_logged"] = sorted({*record["validation_logged"], *map(_logged_key, entries)})
            run.write_json(layout.TRACKERS, record)
        return [entry["step"] for entry in entries]

    def validation(self, entry: dict[str, Any], run: RunDir) -> None:
        """One validation entry: each figure per guidance scale, and the grids."""
        values = {
            f"validation/{metric}/guidance_{scale}": value
            for metric, by_scale in entry.get("metrics", {}).items()
            for scale, value in by_scale.items()
            if isinstance(value, (int, float))
        }
        if values:
            self._each("metrics", values, entry["step"])
        for scale, relative in entry.get("images", {}).items():
            self._each("image", f"validation/guidance_{scale}", run.read_bytes(relative), Path(relative).name, entry["step"])

    def close(self) -> None:
        self._each("close")

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001
                _warn(tracker.name, f"failed in {method}", error)
                self.active.remove(tracker)


def unlogged(run: RunDir) -> list[dict[str, Any]]:
    """The entries of sample/validation.json that trackers.json does not list as logged."""
    if not run.exists(layout.SAMPLE_VALIDATION):
        return []
    done = set(run.read_json(layout.TRACKERS, default={"validation_logged": []})["validation_logged"])
    return [entry for entry in run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"] if _logged_key(entry) not in done]


def _logged_key(entry: dict[str, Any]) -> str:
    """A validation as trackers.json lists it: its step and when it was made (validated again, it is logged again)."""
    return f"{entry['step']}@{entry.get('validated_at', '')}"


def _warn(name: str, what: str, error: Exception) -> None:
    logger.warning(f"tracker {name!r} {what} ({type(error).__name__}: {error}); it is off from here on, the run goes on")


class _Mlflow:
    """One MLflow run through MlflowClient (no global active run: the worker may hold others)."""

    name = "mlflow"

    def __init__(self, run: RunDir, run_name: str, project: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"run_dir": run.url}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.id).data.params  # a resumed run logs only what is new (MLflow refuses changes)
        items = [Param(key, str(value)[:6000]) for key, value in params.items() if key not in logged]
        for start in range(0, len(items), PARAM_CHUNK):
            self.client.log_batch(self.id, params=items[start : start + PARAM_CHUNK])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def image(self, key: str, png: bytes, file_name: str, step: int) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlflow-") as folder:
            path = Path(folder, file_name)
            path.write_bytes(png)
            self.client.log_artifact(self.id, str(path), artifact_path=f"{key.replace('/', '_')}/step-{step}")

    def close(self) -> None:
        self.client.set_terminated(self.id)


class _Wandb:
    """One W&B run, resumed by id; validation figures on their own axis (`validation/step`), since W&B
    drops a step below one already logged and validation lags training."""

    name = "wandb"

    def __init__(self, run: RunDir, run_name: str, project: str, run_id: str | None):
        import wandb

        folder = os.environ.get("WANDB_DIR") or (run.path(layout.TRAIN_DIR) if run.is_local else None)  # RUN/train/wandb/
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project),
            name=run_name,
            id=run_id,  # None: a new run, whose id trackers.json keeps
            resume="allow" if run_id else None,
            dir=folder,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("validation/step")
        self.run.define_metric("validation/*", step_metric="validation/step")
        self.id = self.run.id

    def params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if any(key.startswith("validation/") for key in values):
            self.run.log({**values, "validation/step": step})
        else:
            self.run.log(values, step=step)

    def image(self, key: str, png: bytes, file_name: str, step: int) -> None:
        import io

        from PIL import Image

        self.run.log({key: self.wandb.Image(Image.open(io.BytesIO(png)), caption=file_name), "validation/step": step})

    def close(self) -> None:
        self.run.finish()


class _Tensorboard:
    """Validation figures and grids as TensorBoard events in RUN/train/logs, beside train.metrics' training scalars
    (TensorBoard reads every event file of the folder as one run); each file uploaded whole after each validation."""

    name = "tensorboard"

    def __init__(self, run: RunDir, run_name: str, project: str, run_id: str | None):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        self.run, self.local = run, tempfile.mkdtemp(prefix="validation-logs-")
        self.writer = SummaryWriter(self.local, filename_suffix=".validation")
        self.id = None  # nothing to reopen: every process writes a file of its own
        self.written = False

    def params(self, params: dict[str, Any]) -> None:
        pass  # the config is in the run's config.toml

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if key.startswith("validation/"):  # the training scalars are train.metrics' own
                self.writer.add_scalar(key, value, step)
                self.written = True
        self._upload()

    def image(self, key: str, png: bytes, file_name: str, step: int) -> None:
        import io

        import numpy as np
        from PIL import Image

        self.writer.add_image(key, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")
        self.written = True
        self._upload()

    def close(self) -> None:
        self.writer.close()
        self._upload()
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self) -> None:
        if not self.written:
            return  # no empty event file for a process that validated nothing
        self.writer.flush()
        for name in sorted(os.listdir(self.local)):
            self.run.write_bytes(f"{layout.TRAIN_LOGS}/{name}", Path(self.local, name).read_bytes())


_KINDS = {"mlflow": _Mlflow, "wandb": _Wandb, "tensorboard": _Tensorboard}
