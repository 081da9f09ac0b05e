"""Validation beside training (sample.watch): the watcher alone, its failures, and a real train stage
(Ray Train + DeepSpeed on 2 CPU workers) whose exports get validated before the stage returns."""

from __future__ import annotations

import logging
import time

import pytest
from sample_support import sample_config
from synthetic_latents import write_latent_run

from pipeline import runner
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.resources import training_reservation
from sample import watch
from sample.validate import stage as validate
from sample.watch import Watcher, crowded_out


def entries(run) -> list[dict]:
    return validate.read_validation(run)["checkpoints"]


def test_watcher_validates_the_newest_export_first_and_the_stage_counts_it_done(synthetic_run, model_dirs):
    config = sample_config(model_dirs, guidance_scales=[3.0])
    watcher = Watcher(config, synthetic_run, remote=False)
    assert watcher.poll() == 20  # the newest first: keep up with training, leave older ones to the stage
    assert watcher.poll() == 10
    assert watcher.poll() is None
    assert [(e["step"], e["during_training"]) for e in entries(synthetic_run)] == [(10, True), (20, True)]
    assert all("validated_at" in e and e["metrics"]["prompt_accuracy"] for e in entries(synthetic_run))

    summary = validate.run_stage(config, synthetic_run)
    assert summary["validated"] == [] and summary["counts"]["validated_during_training"] == 2


def test_a_failed_validation_is_recorded_not_raised_and_the_watcher_goes_on(synthetic_run, model_dirs):
    # Committed but holding no model (never happens with put_dir; stands for any validation error).
    synthetic_run.write_text(f"{layout.TRAIN_EXPORT}/{layout.step_name(30)}/{layout.COMMIT_MARKER}", "x\n")
    watcher = Watcher(sample_config(model_dirs, guidance_scales=[3.0], watch_interval_s=0.05), synthetic_run, remote=False)
    watcher.start()
    deadline = time.monotonic() + 120
    while len(watcher.validated) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    summary = watcher.stop()
    assert summary["validated"] == [20, 10]
    assert list(summary["errors"]) == ["30"] and "unet" in summary["errors"]["30"]
    assert [e["step"] for e in entries(synthetic_run)] == [10, 20]


@pytest.mark.e2e  # real Ray Train workers and a watcher actor (about 30 s): `make test-e2e` runs it
def test_exports_are_validated_while_the_train_stage_runs(tmp_path, ray_local, monkeypatch):
    run = write_latent_run(tmp_path / "run")
    config = load_config(
        "tiny",
        overrides=[
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.batch_size_per_worker=8",
            "train.warmup_steps=0",
            "train.max_steps=8",
            "train.checkpoint_every=2",
            "train.log_every=4",
            'sample.prompts=["a red circle on a green background"]',
            "sample.seeds=[0]",
            "sample.guidance_scales=[3.0]",
            "sample.steps=2",
            "sample.watch_interval_s=0.5",
        ],
    )
    chain = runner.fingerprints(config)
    for name in ("ingest", "encode"):  # write_latent_run stands for them
        run.update_stage(name, status="done", fingerprint=chain[name][0], base_fingerprint=chain[name][1])

    seen = {}
    real_stage_function = runner.stage_function

    def stage_function(name):
        function = real_stage_function(name)
        if name != "train":
            return function

        def train(config, run):
            summary = function(config, run)
            seen["validated"] = [e["step"] for e in entries(run)]  # what the watcher had recorded when training returned
            return summary

        return train

    monkeypatch.setattr(runner, "stage_function", stage_function)
    runner.run_stages(config, run, ["train", "sample"])

    exported = run.committed_steps(layout.TRAIN_EXPORT)
    assert exported == [2, 4, 6, 8]
    assert seen["validated"], "the watcher validated no export before the train stage returned"
    watched = [e["step"] for e in entries(run) if e.get("during_training")]
    assert set(seen["validated"]) <= set(watched)
    assert [e["step"] for e in entries(run)] == exported  # the sample stage did the rest
    stage = run.stage("sample")
    assert stage["status"] == "done" and sorted(stage["watch"]["validated"]) == watched and stage["watch"]["errors"] == {}
    assert stage["counts"]["validated_during_training"] == len(watched)
    assert sorted(stage["validated"] + watched) == exported
    print(f"\nvalidated beside training: {watched} (when train returned: {seen['validated']})")


@pytest.mark.e2e  # a real train stage with its watcher (about 15 s): `make test-e2e`, keeping `make test` under 8 minutes
def test_the_runner_watches_training_and_the_sample_stage_keeps_what_was_watched(
    synthetic_run, model_dirs, tmp_path, monkeypatch, ray_local
):
    """Stand-in train stage (it exports step 10 and waits for the watcher); the real sample stage."""
    from sample_support import export_step

    config = sample_config(model_dirs, guidance_scales=[3.0], watch_interval_s=0.05)
    chain = runner.fingerprints(config)
    for name in ("ingest", "encode"):
        synthetic_run.update_stage(name, status="done", fingerprint=chain[name][0], base_fingerprint=chain[name][1])
    # Left by an earlier training: stale once training starts over.
    synthetic_run.write_json(layout.SAMPLE_VALIDATION, {"checkpoints": [{"step": 99}], "best": None})

    def train(config, run):
        assert not run.exists(layout.SAMPLE_VALIDATION)  # emptied before the watcher started
        export_step(run, 10, tmp_path)
        deadline = time.monotonic() + 120
        while not entries(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"counts": {}}

    real_stage_function = runner.stage_function
    monkeypatch.setattr(runner, "stage_function", lambda name: train if name == "train" else real_stage_function(name))
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)  # ray_local is up
    for force in (False, True):  # under force too, what the watcher did for this training stays
        runner.run_stages(config, synthetic_run, ["train", "sample"], force=force, restart="train")
        stage = synthetic_run.stage("sample")
        assert stage["status"] == "done" and stage["watch"] == {"started": True, "validated": [10], "errors": {}}
        assert stage["counts"]["validated_during_training"] == 1 and stage["counts"]["newly_validated"] == 0
        assert [(e["step"], e["during_training"]) for e in entries(synthetic_run)] == [(10, True)]


def test_stopping_does_not_wait_for_an_actor_that_never_got_its_resources(synthetic_run, model_dirs, ray_local):
    config = sample_config(model_dirs, guidance_scales=[3.0], watch_interval_s=0.05, watch_gpus=1.0)  # no GPU here
    watcher = Watcher(config, synthetic_run).start()
    time.sleep(2)
    started = time.monotonic()
    summary = watcher.stop()
    assert time.monotonic() - started < 30
    assert summary["validated"] == [] and "did not start" in summary["errors"]["20"]
    assert not synthetic_run.exists(layout.SAMPLE_VALIDATION)


def test_the_trainer_reserves_nothing_beyond_its_workers_in_this_ray_version():
    config = load_config("tiny", overrides=["train.num_workers=3", "train.cpus_per_worker=0.5", "train.use_gpu=true"])
    # Ray Train V2's controller actor takes 0 CPUs (ScalingConfig.total_resources would count it otherwise).
    assert training_reservation(config) == {"CPU": 1.5, "GPU": 3.0}


def test_a_one_gpu_watcher_does_not_fit_beside_64_one_gpu_workers_on_64_gpus():
    config = load_config("sd15-256", overrides=["train.num_workers=64", "train.use_gpu=true"])
    assert (config.sample.watch_gpus, config.sample.watch_cpus, config.train.cpus_per_worker) == (1.0, 4.0, 8.0)
    assert crowded_out(config, {"CPU": 1024.0, "GPU": 64.0}) == (
        "training takes 64 of 64 GPUs (train.num_workers = 64, one GPU each) and the watcher asks for 1 (sample.watch_gpus)"
    )
    assert crowded_out(config, {"CPU": 1024.0, "GPU": 65.0}) is None  # one GPU to spare
    both = crowded_out(config, {"CPU": 514.0, "GPU": 64.0})
    assert "64 of 64 GPUs" in both
    assert both.endswith(
        "training takes 512 of 514 CPUs (train.num_workers = 64 x train.cpus_per_worker = 8) and the watcher asks for 4 "
        "(sample.watch_cpus)"
    )


@pytest.mark.parametrize(
    ("workers", "cpus_per_worker", "watch_cpus", "watch_gpus", "cpus", "fits"),
    [
        (2, 1.0, 0.5, 0.0, 2.0, False),  # training holds both CPUs
        (2, 0.5, 0.5, 0.0, 2.0, True),
        (2, 0.5, 1.5, 0.0, 2.0, False),
        (3, 0.1, 0.7, 0.0, 1.0, True),  # 1.0000000000000002 of 1 CPU: rounding, not a lack of room
        (2, 1.0, 0.0, 0.0, 2.0, True),  # reserving nothing, it shares training's CPUs (the 2-core demo)
        (4, 1.0, 0.0, 0.0, 2.0, True),  # nor is it judged whether training itself fits
        (1, 0.5, 0.0, 1.0, 2.0, False),  # no GPU on the cluster
    ],
)
def test_the_watcher_fits_where_its_reservation_fits_beside_training(
    workers, cpus_per_worker, watch_cpus, watch_gpus, cpus, fits
):
    config = load_config(
        "tiny",
        overrides=[
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus_per_worker}",
            f"sample.watch_cpus={watch_cpus}",
            f"sample.watch_gpus={watch_gpus}",
        ],
    )
    reason = crowded_out(config, {"CPU": cpus})
    assert (reason is None) == fits
    if watch_gpus:
        assert reason == "training takes 0 of 0 GPUs (train.use_gpu = false) and the watcher asks for 1 (sample.watch_gpus)"


def run_with_a_stand_in_train_stage(synthetic_run, model_dirs, tmp_path, monkeypatch, train: dict, sample: dict) -> dict:
    """The runner (on ray_local's 2 CPUs) with a stand-in train stage, which exports steps 20 and 30 and waits for
    a validation for as long as a started watcher may take, and the real sample stage; what the stand-in saw."""
    from sample_support import export_step

    config = sample_config(model_dirs, guidance_scales=[3.0], watch_interval_s=0.05, **sample)
    config = config.model_copy(update={"train": config.train.model_copy(update=train)})
    chain = runner.fingerprints(config)
    for name in ("ingest", "encode"):
        synthetic_run.update_stage(name, status="done", fingerprint=chain[name][0], base_fingerprint=chain[name][1])
    seen = {}

    def train_stage(config, run):
        for step in (20, 30):  # train/ was moved aside: training starts over
            export_step(run, step, tmp_path)
        seen["watch"] = run.stage("sample").get("watch")  # what the runner recorded before training
        deadline = time.monotonic() + 120
        while seen["watch"] is None and not run.exists(layout.SAMPLE_VALIDATION) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["validated"] = [e["step"] for e in entries(run)] if run.exists(layout.SAMPLE_VALIDATION) else []
        return {"counts": {}}

    real_stage_function = runner.stage_function
    monkeypatch.setattr(runner, "stage_function", lambda name: train_stage if name == "train" else real_stage_function(name))
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)  # ray_local is up
    runner.run_stages(config, synthetic_run, ["train", "sample"], restart="train")  # over the fixture's exports
    return seen


def test_a_watcher_that_does_not_fit_beside_training_is_not_started_and_the_stage_validates_everything(
    synthetic_run, model_dirs, tmp_path, monkeypatch, ray_local, caplog
):
    """Training takes 2 workers x 1 CPU of 2: the watcher's actor (0.5 CPU) would wait all training long."""
    caplog.set_level(logging.INFO, logger="pipeline")

    def start(self):
        raise AssertionError("the watcher was started")

    monkeypatch.setattr(watch.Watcher, "start", start)
    train, sample = {"num_workers": 2, "cpus_per_worker": 1.0}, {"watch_cpus": 0.5}
    seen = run_with_a_stand_in_train_stage(synthetic_run, model_dirs, tmp_path, monkeypatch, train, sample)

    reason = (
        "training takes 2 of 2 CPUs (train.num_workers = 2 x train.cpus_per_worker = 1) and the watcher asks for 0.5 "
        "(sample.watch_cpus)"
    )
    assert seen == {"watch": {"started": False, "reason": reason, "validated": [], "errors": {}}, "validated": []}
    assert f"validation watcher not started: {reason}; every export is validated after training instead" in caplog.text
    stage = synthetic_run.stage("sample")
    assert stage["status"] == "done" and stage["watch"] == seen["watch"]
    assert stage["validated"] == [20, 30] and stage["counts"]["validated_during_training"] == 0
    assert [(e["step"], e.get("during_training", False)) for e in entries(synthetic_run)] == [(20, False), (30, False)]


def test_a_watcher_that_fits_beside_training_is_started(synthetic_run, model_dirs, tmp_path, monkeypatch, ray_local, caplog):
    """Training takes 1 worker x 1 CPU of 2: the watcher's actor gets the other CPU and validates while training runs."""
    caplog.set_level(logging.INFO, logger="pipeline")
    train, sample = {"num_workers": 1, "cpus_per_worker": 1.0}, {"watch_cpus": 1.0}
    seen = run_with_a_stand_in_train_stage(synthetic_run, model_dirs, tmp_path, monkeypatch, train, sample)

    # One export validated beside training (20, when it polled before 30 was written, else 30).
    assert seen["watch"] is None and len(seen["validated"]) == 1
    assert "validation watcher not started" not in caplog.text
    stage = synthetic_run.stage("sample")
    assert stage["status"] == "done" and stage["watch"]["started"] is True
    assert set(seen["validated"]) <= set(stage["watch"]["validated"]) and stage["watch"]["errors"] == {}
    during = [e["step"] for e in entries(synthetic_run) if e.get("during_training")]
    assert sorted(stage["watch"]["validated"]) == during and [e["step"] for e in entries(synthetic_run)] == [20, 30]
