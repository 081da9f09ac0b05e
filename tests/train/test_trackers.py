"""Experiment trackers (train.trackers): rank 0's metrics log sends the config, each logged step and the
watcher's validations to a real MLflow tracking server started here on 127.0.0.1 and to W&B in offline
mode; a resumed run and the sample stage go on in the same tracker runs, logging no validation twice;
and a tracker whose server is gone logs one warning and never stops training."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir
from pipeline.core.trackers import Trackers
from sample.grid import png_bytes
from train.metrics import MetricsLog


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (a sqlite store and a local artifact root); its URI. Stopped by PID."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{folder}/store.db",
        f"--artifacts-destination={folder}/artifacts",
        "--workers=1",
    ]
    with open(folder / "server.log", "w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # ready once it answers on its port
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        pytest.fail("mlflow server did not start in 120 s: " + (folder / "server.log").read_text()[-3000:])
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(autouse=True)
def pipeline_log_reaches_caplog(monkeypatch):
    """The console setup of an earlier test may have stopped the pipeline's logger propagating to the root."""
    monkeypatch.setattr(logging.getLogger("pipeline"), "propagate", True)


@pytest.fixture
def tracker_env(monkeypatch, mlflow_server, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{tmp_path.name}")


def config(*overrides: str):
    return load_config("tiny", overrides=['train.trackers=["tensorboard","mlflow","wandb"]', *overrides])


def row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 0.5, "samples_per_s": 80.0}


def validated(run: RunDir, step: int, accuracy: float) -> None:
    """An entry as the watcher records it, with its grid."""
    import numpy as np
    from PIL import Image

    grid = f"{layout.SAMPLE_IMAGES}/step-{step}-g3.png"
    run.write_bytes(grid, png_bytes(Image.fromarray(np.full((8, 8, 3), step % 255, np.uint8))))
    entries = run.read_json(layout.SAMPLE_VALIDATION, default={"checkpoints": []})["checkpoints"]
    entry = {"step": step, "metrics": {"prompt_accuracy": {"3": accuracy, "0": 0.0}}, "images": {"3": grid}}
    run.write_json(layout.SAMPLE_VALIDATION, {"checkpoints": [*entries, entry], "best": None})


@pytest.mark.e2e  # a real MLflow server and three W&B sessions (about 20 s): `make test-e2e`, keeping `make test` under 8 minutes
def test_config_steps_and_validations_reach_mlflow_and_wandb_once_across_a_resume(tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient

    run = RunDir(tmp_path / "run")
    settings = config("train.lr=0.00025")
    first = MetricsLog(run, 0, enabled=True, config=settings, counts={"total": 42})
    first.add(row(10, 0.5))
    validated(run, 10, 0.25)  # the watcher validates step 10 meanwhile
    first.add(row(20, 0.4))  # ...and the next log step sends it
    first.close()

    ids = run.read_json(layout.TRACKERS)["ids"]
    client = MlflowClient()
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.run_name == "run" and mlflow_run.data.params["train.lr"] == "0.00025"
    assert mlflow_run.data.params["parameters.total"] == "42" and mlflow_run.data.params["train.trackers"].startswith("[")
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")] == [(10, 0.5), (20, 0.4)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "validation/prompt_accuracy/guidance_3")] == [
        (10, 0.25)
    ]
    artifacts = [item.path for item in client.list_artifacts(ids["mlflow"], "validation_guidance_3/step-10")]
    assert artifacts == ["validation_guidance_3/step-10/step-10-g3.png"]

    # Resumed from step 10: the same tracker runs; the validation of step 10 is not logged again.
    resumed = MetricsLog(run, 10, enabled=True, config=settings, counts={"total": 42})
    resumed.add(row(20, 0.35))
    resumed.close()
    validated(run, 20, 0.75)  # validated after training: the sample stage's to log
    from sample.validate.stage import run_stage

    run_stage(settings.model_copy(update={"sample": settings.sample.model_copy(update={"prompts": []})}), run)
    assert run.read_json(layout.TRACKERS)["ids"] == ids and run.read_json(layout.TRACKERS)["validation_logged"] == ["10@", "20@"]
    history = client.get_metric_history(ids["mlflow"], "validation/prompt_accuracy/guidance_3")
    assert sorted((m.step, m.value) for m in history) == [(10, 0.25), (20, 0.75)]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"

    # TensorBoard: the training scalars (train.metrics) and the validations, each once, in train/logs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run.path(layout.TRAIN_LOGS), size_guidance={"images": 0, "scalars": 0}).Reload()
    accuracy = [(event.step, event.value) for event in events.Scalars("validation/prompt_accuracy/guidance_3")]
    assert sorted(accuracy) == [(10, 0.25), (20, 0.75)] and "train/loss" in events.Tags()["scalars"]
    assert sorted(image.step for image in events.Images("validation/guidance_3")) == [10, 20]

    # W&B offline: one run folder per session, all under one id, with the run's files.
    # (Sessions started in the same second get W&B's "-1" suffix.)
    folders = sorted(Path(run.path(layout.TRAIN_DIR), "wandb").glob(f"offline-run-*-{ids['wandb']}*"))
    assert len(folders) == 3, folders  # training, the resume, the sample stage
    assert all((folder / f"run-{ids['wandb']}.wandb").stat().st_size > 0 for folder in folders)
    assert any((folder / "files" / "media").is_dir() for folder in folders)  # the grid went with the validation


def test_a_tracker_whose_server_is_gone_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run = RunDir(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        metrics = MetricsLog(run, 0, enabled=True, config=load_config("tiny", overrides=['train.trackers=["mlflow"]']))
        for step in (10, 20, 30):
            metrics.add(row(step, 0.5))
        metrics.close()
    warnings = [record.getMessage() for record in caplog.records if "tracker 'mlflow'" in record.getMessage()]
    assert len(warnings) == 1 and "could not be opened" in warnings[0] and "the run goes on" in warnings[0]
    assert [r["step"] for r in metrics.rows] == [10, 20, 30] and run.exists(layout.TRAIN_METRICS)
    assert not run.exists(f"{layout.TRAIN_LOGS}")  # "tensorboard" left out of train.trackers: no event files


def test_a_tracker_failing_mid_run_is_turned_off_after_one_warning(caplog):
    class Flaky:
        name, calls = "flaky", 0

        def metrics(self, values, step):
            Flaky.calls += 1
            raise ConnectionError("server went away")

    trackers = Trackers([Flaky()])
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            trackers.metrics({"train/loss": 0.5}, step)
    assert Flaky.calls == 1 and trackers.active == []
    assert [record.getMessage() for record in caplog.records].count(
        "tracker 'flaky' failed in metrics (ConnectionError: server went away); it is off from here on, the run goes on"
    ) == 1


def test_a_tracker_that_cannot_log_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    from synthetic_latents import write_latent_run

    from pipeline.core import trackers
    from train.stage import TrainStageError, check_inputs

    run = write_latent_run(tmp_path / "run")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrainStageError, match="train.trackers names mlflow, but MLFLOW_TRACKING_URI is not set"):
        check_inputs(config(), run)
    monkeypatch.setitem(trackers.PACKAGES, "wandb", "wandb_not_installed_here")
    missing = r"train.trackers names wandb, not installed here: pip install 't2i-pipeline\[trackers\]'"
    with pytest.raises(TrainStageError, match=missing):
        check_inputs(config(), run)
    # The workers get the trackers' variables from where `pipeline` runs, but no key: a runtime env is readable.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("WANDB_API_KEY", "a-secret")
    given = trackers.environment()
    assert {"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}.items() <= given.items()
    assert "a-secret" not in given.values()


def test_validations_that_cannot_be_read_warn_once_and_are_tried_again(tmp_path, caplog):
    class Recording:
        name, id, logged = "recording", None, []

        def metrics(self, values, step):
            Recording.logged.append(step)

        def image(self, key, png, file_name, step):
            pass

    run = RunDir(tmp_path / "run")
    validated(run, 10, 0.5)
    grid = run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"][0]["images"]["3"]
    png = run.read_bytes(grid)
    os.remove(run.path(grid))  # a grid the trackers cannot read (a storage error looks the same)
    trackers = Trackers([Recording()])
    with caplog.at_level(logging.WARNING):
        assert trackers.new_validations(run) == [] and trackers.new_validations(run) == []
    assert sum("could not log the new validations" in record.getMessage() for record in caplog.records) == 1
    run.write_bytes(grid, png)  # the grid is back: the next log step logs the validation, once
    assert trackers.new_validations(run) == [10] and trackers.new_validations(run) == []
