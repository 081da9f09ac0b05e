"""The runner's skip / resume / restart rules, with stand-in stages that record their calls."""

import pytest

from pipeline import runner
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir


def test_finished_run_skips_every_stage(tmp_path, fake_stages):
    calls, _ = fake_stages
    config, run = load_config("tiny"), RunDir(tmp_path)
    runner.run_stages(config, run)
    assert calls == list(layout.STAGES)
    runner.run_stages(config, run)
    assert calls == list(layout.STAGES)  # nothing ran again
    assert all(run.stage(name)["status"] == "done" for name in layout.STAGES)
    assert run.exists(layout.CONFIG)


def test_half_finished_run_resumes_at_first_incomplete_stage(tmp_path, fake_stages):
    calls, fail = fake_stages
    config, run = load_config("tiny"), RunDir(tmp_path)
    fail["train"] = 1
    with pytest.raises(RuntimeError, match="train broke"):
        runner.run_stages(config, run)
    assert run.stage("train")["status"] == "failed" and "train broke" in run.stage("train")["error"]
    calls.clear()
    runner.run_stages(config, run)
    assert calls == ["train", "sample", "report"]


def test_changed_section_reruns_that_stage_and_later_ones_only(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["train.lr=1e-4"]), run, restart="train")
    assert calls == ["train", "sample", "report"]
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["train.lr=1e-4", "sample.steps=5"]), run, restart="sample")
    assert calls == ["sample", "report"]


def test_a_changed_key_never_starts_a_stage_over_on_its_outputs_unasked(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    (tmp_path / "train" / "step-0000500").mkdir()
    before = run.read_text(layout.CONFIG)
    calls.clear()
    changed = load_config("tiny", overrides=["train.lr=0.000123", "ingest.toy_count=96"])
    with pytest.raises(runner.StageError) as refused:
        runner.run_stages(changed, run)
    message = str(refused.value)
    # The first stage that would start over, the keys that changed (old -> new), both ways out.
    assert "stage 'ingest' would start over" in message
    assert f"ingest.toy_count: {load_config('tiny').ingest.toy_count} -> 96" in message
    assert "--out" in message and "--restart ingest" in message and "--force" in message
    assert "train.lr" not in message  # the first blocked stage's chain only: ingest reads no train key
    assert calls == []  # nothing ran, nothing was written
    assert run.read_text(layout.CONFIG) == before
    assert (tmp_path / "train" / "step-0000500").is_dir()
    with pytest.raises(runner.StageError, match=rf"train.lr: {load_config('tiny').train.lr} -> 0.000123"):
        runner.run_stages(load_config("tiny", overrides=["train.lr=0.000123"]), run)


def test_restart_moves_the_old_outputs_aside_and_records_them(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    (tmp_path / "train" / "step-0000500").mkdir()
    old_fingerprint = run.stage("train")["fingerprint"]
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["train.lr=1e-4"]), run, restart="train")
    assert calls == ["train", "sample", "report"]
    aside = sorted(path.name for path in tmp_path.glob("train.superseded-*"))
    assert len(aside) == 1 and (tmp_path / aside[0] / "step-0000500").is_dir()  # kept, not deleted
    assert not (tmp_path / "train" / "step-0000500").exists()  # the stage started from an empty folder
    assert len(list(tmp_path.glob("sample.superseded-*"))) == 1
    assert not list(tmp_path.glob("report.superseded-*"))  # rebuilt from the rest: nothing to keep
    records = {entry["stage"]: entry for entry in run.manifest()["superseded"]}
    assert records["train"]["folder"] == aside[0] and records["train"]["fingerprint"] == old_fingerprint
    with pytest.raises(runner.StageError, match="--restart 'nonsense'"):
        runner.run_stages(load_config("tiny"), run, restart="nonsense")


def test_force_moves_outputs_aside_instead_of_deleting_them(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    runner.run_stages(load_config("tiny"), run, stages=["ingest"], force=True)
    assert [path.name.split(".")[0] for path in tmp_path.glob("*.superseded-*")] == ["ingest"]
    assert (next(tmp_path.glob("ingest.superseded-*")) / "out.txt").read_text() == "x"


def test_a_stage_without_outputs_starts_over_without_asking(tmp_path, fake_stages):
    calls, fail = fake_stages
    run = RunDir(tmp_path)
    fail["ingest"] = 1
    with pytest.raises(RuntimeError):
        runner.run_stages(load_config("tiny"), run)
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["ingest.toy_count=96"]), run)  # ingest wrote nothing
    assert calls == list(layout.STAGES)


def test_single_stage_requires_earlier_stages_done(tmp_path, fake_stages):
    run = RunDir(tmp_path)
    with pytest.raises(runner.StageError, match="ingest"):
        runner.run_stages(load_config("tiny"), run, stages=["encode"])


def test_force_reruns_a_done_stage(tmp_path, fake_stages):
    calls, _ = fake_stages
    config, run = load_config("tiny"), RunDir(tmp_path)
    runner.run_stages(config, run)
    calls.clear()
    runner.run_stages(config, run, stages=["sample"], force=True)
    assert calls == ["sample"]


def test_raising_max_steps_resumes_training_and_keeps_its_outputs(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    (tmp_path / "train" / "checkpoint-from-before").write_text("kept")
    (tmp_path / "sample" / "validated-before").write_text("kept")
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["train.max_steps=3000"]), run)
    assert calls == ["train", "sample", "report"]
    assert (tmp_path / "train" / "checkpoint-from-before").exists()  # resumed, not wiped
    assert (tmp_path / "sample" / "validated-before").exists()  # validation stays incremental
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["train.max_steps=3000", "train.lr=1e-4"]), run, restart="train")
    assert calls == ["train", "sample", "report"]
    assert not (tmp_path / "train" / "checkpoint-from-before").exists()  # a real change starts over
    assert not (tmp_path / "sample" / "validated-before").exists()
    assert (next(tmp_path.glob("train.superseded-*")) / "checkpoint-from-before").exists()  # set aside


TRAIN_OPTIONS = [
    "train.min_snr_gamma=5.0",
    "train.noise_offset=0.1",
    "train.deepspeed.zero_optimization.overlap_comm=true",
]


@pytest.mark.parametrize("override", TRAIN_OPTIONS)
def test_train_options_other_than_how_far_to_go_restart_training(override):
    """Only the resumable keys (max_steps, cadence) let a changed train section resume."""
    before = runner.fingerprints(load_config("tiny"))["train"]
    after = runner.fingerprints(load_config("tiny", overrides=[override]))["train"]
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.parametrize("override", ["train.max_failures=2", "train.max_nonfinite_streak=5", "encode.batch_size=7"])
def test_failure_handling_and_throughput_keys_resume_instead_of_restarting(override):
    section = override.split(".")[0]
    before = runner.fingerprints(load_config("tiny"))[section]
    after = runner.fingerprints(load_config("tiny", overrides=[override]))[section]
    assert after[0] != before[0] and after[1] == before[1]


def test_optional_keys_left_unset_do_not_enter_the_fingerprint():
    """A release that adds an optional key (default None or empty) must not redo existing runs' stages."""
    config = load_config("tiny")
    now = config.model_dump(mode="json")
    before_the_keys_existed = config.model_dump(mode="json")
    for key in ("init_from", "init_subfolder", "freeze", "beta_start", "beta_end", "lora"):
        del before_the_keys_existed["train"][key]
    assert runner._without_unset(now) == runner._without_unset(before_the_keys_existed)
    # Keys added with a default that keeps the old behaviour (runner.NEUTRAL_DEFAULTS) stay out at that default.
    assert not {"lora_fuse_export", "trackers", "tracker_project"} & set(runner._fingerprinted(config)["train"])
    assert (
        runner.fingerprints(load_config("tiny", overrides=["train.freeze=['conv_in']"]))["train"]
        != runner.fingerprints(config)["train"]
    )


def _mode(before: list[str], after: list[str], stage: str) -> str:
    """How `stage` runs under `after` once it ran under `before` (what run.json then records)."""
    old, new = load_config("tiny", overrides=before), load_config("tiny", overrides=after)
    entry = {
        "status": "done",
        "base_fingerprint": runner.fingerprints(old)[stage][1],
        "phase_fingerprint": runner.phase_fingerprints(old)[stage],
    }
    return runner.continuation(entry, runner.fingerprints(new)[stage][1], runner.phase_fingerprints(new)[stage])


@pytest.mark.parametrize(
    ("change", "encode", "train"),
    [
        (["encode.resolution=32"], "new phase", "new phase"),  # a multi-resolution schedule's next phase
        (["encode.resolution=32", "train.max_steps=3000", "encode.batch_size=7"], "new phase", "new phase"),
        (["encode.resolution=32", "train.lr=1e-4"], "new phase", "start"),  # another training is another run
        (["encode.resolution=32", "encode.flip_copies=true"], "start", "start"),  # other latents
        (["encode.vae_subfolder='vae'"], "start", "start"),
        (["train.max_steps=3000"], "resume", "resume"),
    ],
)
def test_only_a_resolution_change_upstream_continues_training_in_a_new_phase(change, encode, train):
    assert _mode([], change, "encode") == encode
    assert _mode([], change, "train") == train
    assert _mode([], change, "ingest") == "resume"  # its section did not change: it is skipped, never redone


def test_auto_buckets_follow_the_resolution_into_the_next_phase():
    bucketed = ["ingest.resize_mode='keep_ratio'", "encode.buckets='auto'"]
    larger = [*bucketed, "encode.resolution=32"]
    assert load_config("tiny", overrides=bucketed).encode.buckets != load_config("tiny", overrides=larger).encode.buckets
    assert _mode(bucketed, larger, "train") == "new phase"
    assert _mode(bucketed, [*larger, "encode.flip_copies=true"], "train") == "start"


def test_a_run_recorded_before_phases_existed_starts_over_at_a_new_resolution():
    config = load_config("tiny")
    entry = {"status": "done", "base_fingerprint": runner.fingerprints(config)["train"][1]}  # no phase_fingerprint
    new = load_config("tiny", overrides=["encode.resolution=32"])
    assert runner.continuation(entry, runner.fingerprints(new)["train"][1], runner.phase_fingerprints(new)["train"]) == "start"
    assert runner.continuation({**entry, "phase_fingerprint": "x"}, "y", "x", force=True) == "start"


def test_a_new_resolution_keeps_every_later_stages_output(tmp_path, fake_stages):
    calls, _ = fake_stages
    run = RunDir(tmp_path)
    runner.run_stages(load_config("tiny"), run)
    for name in ("encode", "train", "sample"):
        (tmp_path / name / "from-before").write_text("kept")
    calls.clear()
    runner.run_stages(load_config("tiny", overrides=["encode.resolution=32", "train.max_steps=3000"]), run)
    assert calls == ["encode", "train", "sample", "report"]
    # Kept for the stages to continue from: encode reuses its text embeddings, train its checkpoint.
    assert all((tmp_path / name / "from-before").exists() for name in ("encode", "train", "sample"))
    assert run.stage("train")["phase_fingerprint"] == runner.phase_fingerprints(load_config("tiny"))["train"]
    runner.run_stages(load_config("tiny", overrides=["encode.resolution=32", "train.lr=1e-4"]), run, restart="train")
    assert (tmp_path / "encode" / "from-before").exists() and not (tmp_path / "train" / "from-before").exists()


def test_a_stage_whose_output_version_rose_resumes_in_an_older_run():
    """encode 2 adds the manifest's latent_shards, ingest 2 the checked outcome records: a run made before
    is resumed (which brings the outputs up to date and redoes nothing), not skipped as done nor started
    over; later stages' bases hold."""
    from pipeline.runner import STAGE_SPECS, _chain, continuation, fingerprints

    config = load_config("tiny")
    now, before = fingerprints(config), _chain(config, {})  # `before`: the fingerprints without versions
    assert STAGE_SPECS["ingest"].version > 1 and STAGE_SPECS["encode"].version > 1
    for stage in ("ingest", "encode"):
        assert now[stage][0] != before[stage]
        entry = {"status": "done", "fingerprint": before[stage], "base_fingerprint": now[stage][1]}
        assert continuation(entry, now[stage][1], "") == "resume"


def test_the_cli_passes_restart_to_the_runner(tmp_path, fake_stages):
    from typer.testing import CliRunner

    from pipeline.cli import app

    calls, _ = fake_stages
    out = str(tmp_path / "run")
    assert CliRunner().invoke(app, ["run", "--out", out]).exit_code == 0
    refused = CliRunner().invoke(app, ["run", "--out", out, "--set", "train.lr=1e-4"])
    assert refused.exit_code == 2 and "--restart train" in refused.output
    calls.clear()
    assert CliRunner().invoke(app, ["run", "--out", out, "--set", "train.lr=1e-4", "--restart", "train"]).exit_code == 0
    assert calls == ["train", "sample", "report"] and list((tmp_path / "run").glob("train.superseded-*"))
