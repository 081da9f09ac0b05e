"""Every stage through the real components: the `pipeline` CLI, a loopback HTTP server,
img2dataset, Ray Data, Ray Train + DeepSpeed ZeRO-2 with 2 workers, guided sampling and the
report; then the run directory's contract, and a rerun that skips everything."""

import json
import re

import pytest
from run_contract import SMALL, check_run_contract, pipeline

from pipeline.core import layout
from train.profile import WARMUP


def test_bad_config_fails_before_any_work(tmp_path):
    result = pipeline("run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "train.zero_stage=5")
    assert result.returncode == 2
    assert "train.zero_stage" in result.stderr
    assert not (tmp_path / "run").exists()


def test_config_show_prints_every_section():
    result = pipeline("config", "show", "--preset", "sd15-256")
    assert result.returncode == 0, result.stderr
    for section in ("[ingest]", "[encode]", "[train]", "[sample]"):
        assert section in result.stdout
    assert 'text_encoder = "openai/clip-vit-large-patch14"' in result.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    overrides = [*SMALL, "train.profile=true"]
    result = pipeline("run", "--preset", "tiny", "--out", str(out), *[arg for item in overrides for arg in ("--set", item)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (out.parent / "console.txt").write_text(result.stdout + result.stderr)
    return out


def test_console_shows_each_stage_start_progress_and_end_and_keeps_ray_chatter_in_the_log_file(tiny_run):
    console = (tiny_run.parent / "console.txt").read_text()
    for name in layout.STAGES:
        assert re.search(rf"^\d\d:\d\d:\d\d {name} +start \((start|resume)\)$", console, re.M), (
            name
        )  # sample resumes the watcher's work
        assert re.search(rf"^\d\d:\d\d:\d\d {name} +done in [\d.]+ s", console, re.M), name
    assert re.search(r"\d\d:\d\d:\d\d train +step 8 .* samples/s", console)  # rank 0's lines, forwarded by Ray
    for bar in ("download", "encode"):  # the shard bars, and their summary lines in the stage's logger
        assert re.search(rf"{bar}: 100%.*images/s=", console), bar
    for name in ("ingest", "encode"):
        assert re.search(rf"^\d\d:\d\d:\d\d {name} +(\d+)/\1 shards, [\d,]+ images, [\d.]+ images/s", console, re.M), name
    log_file = (tiny_run / layout.LOGS / "console.log").read_text()
    for chatter in ("Started a local Ray instance", "Token authentication is enabled"):
        assert chatter not in console and chatter in log_file
    assert "Loading weights" not in console


def test_run_directory_contract(tiny_run):
    check_run_contract(str(tiny_run))


def test_profile_times_every_phase_of_both_workers_steps(tiny_run):
    """train.profile on the two ZeRO-2 workers: each phase that the run has takes time, and the rows make up the steps."""
    for rank in (0, 1):
        table = json.loads((tiny_run / layout.TRAIN_PROFILE / f"rank-{rank}.json").read_text())
        assert table["rank"] == rank and table["world_size"] == 2
        assert table["steps_timed"] == 8 - WARMUP and table["setup_seconds"] > 0
        rows = table["rows"]
        for row in ("data", "draws", "forward", "loss check", "backward", "gradient reduce", "optimizer step", "ema"):
            assert rows[row]["ms_per_step"] > 0, (rank, row)
        assert rows["export"]["ms_per_step"] > 0 or rank == 1  # rank 0 writes the exports (steps 4 and 8)
        assert rows["checkpoint"]["ms_per_step"] > 0
        assert sum(figures["share"] for figures in rows.values()) == pytest.approx(1.0, abs=0.01)
        assert sum(figures["ms_per_step"] for figures in rows.values()) == pytest.approx(table["ms_per_step"], rel=0.01)
    console = (tiny_run.parent / "console.txt").read_text()
    assert re.search(r"profile of rank 0 of 2: 6 steps timed", console) and re.search(r"gradient reduce +[\d.]+", console)


def test_rerun_of_a_finished_run_skips_every_stage(tiny_run):
    before = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    result = pipeline("run", "--out", str(tiny_run), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((tiny_run / layout.RUN_MANIFEST).read_text())
    for name in layout.STAGES:
        assert after["stages"][name]["finished"] == before["stages"][name]["finished"]
        assert re.search(rf"^\d\d:\d\d:\d\d {name} +skipped: done at", result.stderr, re.M), name


def test_half_finished_run_resumes_at_the_first_incomplete_stage(tiny_run):
    """Mark `sample` as interrupted and drop the report: a rerun redoes exactly those two,
    and validation, being incremental, samples no checkpoint twice."""
    manifest_path = tiny_run / layout.RUN_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["sample"]["status"] = "running"
    del manifest["stages"]["report"]
    manifest_path.write_text(json.dumps(manifest))
    (tiny_run / layout.REPORT_INDEX).unlink()

    result = pipeline("run", "--out", str(tiny_run), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads(manifest_path.read_text())
    for name in ("ingest", "encode", "train"):
        assert after["stages"][name]["finished"] == manifest["stages"][name]["finished"]
    assert after["stages"]["sample"]["status"] == after["stages"]["report"]["status"] == "done"
    assert after["stages"]["sample"]["counts"]["newly_validated"] == 0
    assert (tiny_run / layout.REPORT_INDEX).exists()
