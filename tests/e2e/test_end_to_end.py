"""Every stage through the real components: the `pipeline` CLI, a loopback HTTP server,
img2dataset, Ray Data, Ray Train + DeepSpeed ZeRO-2 with 2 workers, guided sampling and the
report; then the run directory's contract, and a rerun that skips everything."""

import json
import re

import pytest
from run_contract import SMALL, check_run_contract, pipeline

from pipeline.core import layout


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
    result = pipeline("run", "--preset", "tiny", "--out", str(out), *[arg for item in SMALL for arg in ("--set", item)])
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
