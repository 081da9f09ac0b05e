"""One clear line per mistake, before any work: the real `pipeline` CLI exits with code 2 and one line
naming the option, key or path, with no traceback (issue 24). Also what a fresh machine needs: the
Python floor pyproject.toml states is the README's and the code's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from raw_shards import raw_samples, write_raw_shard
from sample_support import encode_manifest, export_step, sample_config, tiny_text_encoder, tiny_vae
from synthetic_latents import write_latent_run
from typer.testing import CliRunner

from pipeline import cli
from pipeline.core import layout
from pipeline.core.config import load_config, to_toml
from pipeline.core.rundir import RunDir
from pipeline.runner import fingerprints, phase_fingerprints

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def pipeline(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (exit code 2, nothing else on stderr, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# -- a fresh machine ------------------------------------------------------------------------
def test_the_python_floor_is_stated_once_and_true():
    """tomllib (3.11) is imported by the config: requires-python says so, and the README says the same."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", floor)
    assert match and int(match.group(1)) >= 11, floor
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"Python (3\.\d+) or newer", readme)
    assert stated == [f"3.{match.group(1)}"], stated
    # make install refuses an older interpreter before creating .venv, at the same floor.
    assert re.findall(r"sys\.version_info < \(3, (\d+)\)", (ROOT / "Makefile").read_text()) == [match.group(1)]


def test_the_license_is_the_apache_license_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    for part in (*(f"   {number}. " for number in range(1, 10)), "END OF TERMS AND CONDITIONS", "APPENDIX:"):
        assert part in text, part


# -- config ----------------------------------------------------------------------------------
def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path):
    assert one_line(pipeline("config", "show", "--config", "missing.toml", cwd=tmp_path)) == (
        "--config missing.toml: No such file or directory"
    )
    assert one_line(pipeline("config", "show", "--config", str(tmp_path))) == f"--config {tmp_path}: Is a directory"


def test_a_misspelt_key_names_the_key_meant_and_a_bare_list_its_brackets(tmp_path):
    line = one_line(pipeline("run", "--out", str(tmp_path / "run"), "--set", "train.max_step=3"))
    assert line == "invalid config: train.max_step: Extra inputs are not permitted; did you mean train.max_steps?"
    assert not (tmp_path / "run").exists()
    line = one_line(pipeline("config", "show", "--set", "trian.max_steps=3"))
    assert line.endswith("; did you mean train?")
    line = one_line(pipeline("config", "show", "--set", "sample.seeds=0,1"))
    assert line == "invalid config: sample.seeds: Input should be a valid list; did you mean --set sample.seeds=[0,1]?"
    assert load_config("tiny", overrides=["sample.seeds=[0,1]"]).sample.seeds == [0, 1]  # the hint works
    # Two mistakes: one line each.
    lines = pipeline("config", "show", "--set", "train.max_step=3", "--set", "train.lr=-1").stderr.strip().splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 3


def test_config_show_explain_writes_each_description_above_its_key():
    plain, explained = pipeline("config", "show"), pipeline("config", "show", "--explain")
    assert plain.returncode == explained.returncode == 0, explained.stderr
    assert "# Optimizer steps to train.\nmax_steps = " in explained.stdout
    assert "# Optimizer steps" not in plain.stdout
    assert tomllib.loads(explained.stdout) == tomllib.loads(plain.stdout)


def test_every_command_takes_the_same_preset_names():
    full, alias = pipeline("config", "show", "--preset", "sd15-256"), pipeline("config", "show", "--preset", "sd15")
    assert full.returncode == 0 and full.stdout == alias.stdout, alias.stderr
    plans = [pipeline("plan", "--images", "1000", "--json", "--preset", name) for name in ("sd15-256", "sd15")]
    assert plans[0].returncode == 0 and plans[0].stdout == plans[1].stdout, plans[1].stderr
    assert json.loads(plans[0].stdout)["inputs"]["preset"] == "sd15-256"
    expected = "unknown preset 'sd'; choose one of tiny, sd15-256 (or sd15 for sd15-256)"
    assert one_line(pipeline("config", "show", "--preset", "sd")) == expected
    assert one_line(pipeline("plan", "--images", "10", "--preset", "sd")) == f"--preset: {expected}"


@pytest.mark.parametrize(
    "args, line",
    [
        (["plan", "--images", "abc"], "Invalid value for '--images': 'abc' is not a whole number (see pipeline plan --help)"),
        (["plan", "--imagez", "3"], "No such option: --imagez (Possible options: --images) (see pipeline plan --help)"),
        (["run", "--preset", "tiny", "--out"], "Option '--out' requires an argument."),
    ],
)
def test_a_usage_mistake_click_catches_is_one_line_too(args, line):
    """Not click's usage block (Usage:, Try ..., Error: ...)."""
    assert one_line(pipeline(*args)) == line


def test_plan_takes_a_count_written_as_a_float_when_it_is_whole():
    result = pipeline("plan", "--images", "1e8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["inputs"]["images"] == 100_000_000
    refused = pipeline("plan", "--images", "1.5")
    assert refused.returncode == 2 and "'--images': '1.5' is not a whole number" in refused.stderr


def test_help_keeps_the_examples_and_shows_flags_without_a_type():
    top = [line.strip() for line in pipeline("--help").stdout.splitlines()]
    for example in [line for line in cli.__doc__.splitlines() if line.startswith("pipeline ")]:
        assert example in top, (example, top)  # whole, on its own line
    run = pipeline("run", "--help").stdout
    assert "<bool>" not in run and re.search(r"^\s+--force\s+Rerun", run, flags=re.MULTILINE), run


# -- output locations, checked first -----------------------------------------------------------
def test_run_out_where_no_folder_can_be_made_is_one_line():
    assert one_line(pipeline("run", "--preset", "tiny", "--out", "/proc/x")) == (
        "cannot write the run directory /proc/x: No such file or directory"
    )


def test_sample_out_is_checked_before_anything_is_sampled(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_text(layout.CONFIG, to_toml(load_config("tiny")))  # a run with no export: sampling would fail
    assert (
        one_line(pipeline("sample", run.url, "--prompt", "x", "--out", "/proc/x")) == "--out /proc/x: No such file or directory"
    )
    (tmp_path / "file").write_text("")
    line = one_line(pipeline("sample", run.url, "--prompt", "x", "--out", str(tmp_path / "file" / "pngs")))
    assert line == f"--out {tmp_path}/file/pngs: Not a directory"
    # A good --out is made first, and removed again when the work then fails (here: no export to sample).
    code, lines = stage_in_process("sample", run.url, "--prompt", "x", "--out", str(tmp_path / "new" / "pngs"))
    assert code == 2 and not (tmp_path / "new").exists(), lines


# -- a stage's expected failure ------------------------------------------------------------------
def stage_in_process(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def done_before(run: RunDir, config, stage: str) -> None:
    """run.json: the stages before `stage` are done for `config`, and config.toml is its."""
    run.write_text(layout.CONFIG, to_toml(config))
    chain, phases = fingerprints(config), phase_fingerprints(config)
    for name in layout.STAGES[: layout.STAGES.index(stage)]:
        run.update_stage(
            name, status="done", fingerprint=chain[name][0], base_fingerprint=chain[name][1], phase_fingerprint=phases[name]
        )


@pytest.mark.timeout(120)
def test_a_url_list_that_downloads_nothing_is_one_line(tmp_path, ray_local):
    """As with no network: every URL fails to connect (a closed loopback port, allowed for the test)."""
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{index}.jpg,a caption\n" for index in range(3)))
    overrides = [f"ingest.url_list={json.dumps(str(urls))}", "ingest.source='urls'", "ingest.allow_loopback=true"]
    overrides += ["sample.judge='none'", "ingest.timeout_s=5"]
    out = tmp_path / "run"
    code, lines = stage_in_process("run", "--preset", "tiny", "--out", str(out), *sum([["--set", o] for o in overrides], []))
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    expected = "stage 'ingest' failed: ingest downloaded no image out of 3: {\"connection_error\": 3}"
    assert lines[-1] == expected
    assert RunDir(out).stage("ingest")["status"] == "failed" and "encode" not in RunDir(out).manifest()["stages"]


@pytest.mark.timeout(120)
def test_raw_shards_that_encode_nothing_are_one_line(tmp_path, ray_local):
    run = RunDir(tmp_path / "run")
    damaged = raw_samples("x", 2)
    for sample in damaged:
        sample["jpg"] = b"\x89PNG but not really"
    write_raw_shard(run, 0, damaged)
    done_before(run, load_config("tiny", overrides=["encode.cpus_per_actor=0.5"]), "encode")
    code, lines = stage_in_process("encode", run.url)
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    assert lines[-1] == "stage 'encode' failed: encode wrote no sample: no image of any raw shard decoded"


@pytest.mark.timeout(120)
def test_too_few_samples_for_the_workers_is_one_line(tmp_path, ray_local):
    run = write_latent_run(tmp_path / "run", shards=1, per_shard=8)
    done_before(run, load_config("tiny", overrides=["train.num_workers=2", "train.batch_size_per_worker=4"]), "train")
    code, lines = stage_in_process("train", run.url)
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith("stage 'train' failed: ") and "1 latent shard(s) for 2 data streams" in lines[-1]
    assert RunDir(run.url).stage("train")["status"] == "failed"


@pytest.mark.timeout(120)
def test_a_request_the_cluster_can_never_grant_is_one_line_before_any_stage(tmp_path, ray_local):
    """On the session's 2-CPU Ray with no GPU, training on GPUs would wait forever after ingest and encode."""
    out = tmp_path / "run"
    code, lines = stage_in_process("run", "--preset", "tiny", "--out", str(out), "--set", "train.use_gpu=true")
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith(
        "stage 'train' cannot start: each training worker asks for 1 CPU, 1 GPU on one node "
        "(train.num_workers = 2 x (train.cpus_per_worker = 1, one GPU each: train.use_gpu)) but the largest node has "
        "2 CPU, 0 GPU (ray.cluster_resources())"
    )
    assert RunDir(out).manifest()["stages"] == {}


# -- sampling prints its own lines only -------------------------------------------------------------
def test_sample_prints_no_library_warnings_or_load_bars(tmp_path):
    """diffusers warns on every load without accelerate unless told low_cpu_mem_usage=False, and transformers
    draws a bar per load unless the environment says no before it is imported."""
    models = {"vae": tmp_path / "vae", "text_encoder": tmp_path / "text_encoder", "tokenizer": "builtin:clip-tokenizer"}
    tiny_vae().save_pretrained(models["vae"])
    tiny_text_encoder().save_pretrained(models["text_encoder"])
    run = RunDir(tmp_path / "run")
    run.write_json(layout.ENCODE_MANIFEST, encode_manifest(str(models["vae"]), str(models["text_encoder"]), models["tokenizer"]))
    export_step(run, 10, tmp_path)
    run.write_text(layout.CONFIG, to_toml(sample_config(models)))
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run(
        [PIPELINE, "sample", run.url, "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "pngs")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**environment, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines and all(re.match(r"\d\d:\d\d:\d\d sample ", line) for line in lines), result.stderr[-3000:]
