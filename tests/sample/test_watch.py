"""Validation beside training (sample.watch): the watcher alone, its failures, and a real train stage
(Ray Train + DeepSpeed on 2 CPU workers) whose exports get validated before the stage returns."""

from __future__ import annotations

import time

from sample_support import sample_config
from synthetic_latents import write_latent_run

from pipeline import runner
from pipeline.core import layout
from pipeline.core.config import load_config
from sample.validate import stage as validate
from sample.watch import Watcher


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


def test_the_runner_watches_training_and_the_sample_stage_keeps_what_was_watched(
    synthetic_run, model_dirs, tmp_path, monkeypatch
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
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)
    for force in (False, True):  # under force too, what the watcher did for this training stays
        runner.run_stages(config, synthetic_run, ["train", "sample"], force=force)
        stage = synthetic_run.stage("sample")
        assert stage["status"] == "done" and stage["watch"] == {"validated": [10], "errors": {}}
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
