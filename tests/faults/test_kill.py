"""Processes killed mid-work: the whole `pipeline run`, one Ray Train worker, a rank in the middle
of a checkpoint, an encode actor. Each run goes through the real CLI (its own Ray instance, so
the fault in PIPELINE_FAULT reaches every worker; see pipeline/core/faults.py) and ends compared with
one clean run of the same config: the same latents per key, the same loss at every logged step
(the same samples, in the same order), the same weights.

Marked `kill`: `make faults` runs them (.ci/run does), `make test` leaves them out (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from pipeline.core import faults, layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir

pytestmark = pytest.mark.kill

SMALL = [
    "ingest.toy_count=240",
    "ingest.samples_per_shard=60",
    "encode.batch_size=30",
    "train.max_steps=8",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=3",
    "train.warmup_steps=2",
    "train.batch_size_per_worker=8",
    "train.log_every=1",
    "sample.steps=4",
    "sample.seeds=[0]",
    "sample.guidance_scales=[3.0]",
    "sample.watch=false",
    "ray.num_cpus=2",
]
LAST = layout.step_name(8)


def command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "pipeline"), *args]


def run_args(out: Path) -> list[str]:
    return ["run", "--preset", "tiny", "--out", str(out), *[arg for item in SMALL for arg in ("--set", item)]]


def environment(fault: dict | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != faults.ENV}
    return {**env, faults.ENV: json.dumps(fault)} if fault else env


def pipeline(*args: str, fault: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), check=False, capture_output=True, text=True, timeout=timeout, env=environment(fault))


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result.stdout + result.stderr


def run_until_fault_then_kill(args: list[str], fault: dict, timeout: float = 600) -> None:
    """Start `pipeline ARGS` with `fault` (action "stop": the process that hits it freezes), wait
    for it to fire, then SIGKILL the CLI and every process under it, as a crash or an OOM would."""
    process = subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(fault))
    fired = Path(fault["once"])
    deadline = time.monotonic() + timeout
    try:
        while not fired.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended ({process.returncode}) before the fault fired:\n{process.stdout.read()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the fault {fault} did not fire in {timeout} s")
            time.sleep(0.2)  # polling for the marker, not waiting out a race
    finally:
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=60)
        psutil.wait_procs([psutil.Process(pid) for pid in tree if psutil.pid_exists(pid)], timeout=60)


def stages(out: Path) -> dict:
    return json.loads((out / layout.RUN_MANIFEST).read_text())["stages"]


def latents_by_key(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from train.data import load_latent_data

    data = load_latent_data(RunDir(str(out)))
    rows = {}
    for shard in data.shards:
        for part in shard.by_bucket.values():
            for index, key in enumerate(part.keys):
                assert key not in rows, f"{key} is in the latent shards twice"
                rows[key] = (part.latents[layout.LATENT_KEY][index], part.text_embeddings[index])
    return rows


def losses(out: Path) -> dict[int, float]:
    lines = (out / layout.TRAIN_METRICS).read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def checkpoint_state(out: Path, step: int) -> dict:
    return json.loads((out / layout.TRAIN_CHECKPOINTS / layout.step_name(step) / "train_state.json").read_text())


def assert_same_training(out: Path, clean: Path) -> None:
    """The same loss at every logged step and the same final data position and weights as the clean run."""
    got, want = losses(out), losses(clean)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    np.testing.assert_allclose([got[step] for step in sorted(got)], [want[step] for step in sorted(want)], rtol=1e-4)
    assert checkpoint_state(out, 8) == checkpoint_state(clean, 8)
    for folder in (layout.EXPORT_UNET, layout.EXPORT_UNET_ONLINE):
        a = load_file(str(out / layout.TRAIN_EXPORT / LAST / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(clean / layout.TRAIN_EXPORT / LAST / folder / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=f"{folder}/{name}")


def committed(out: Path) -> list[int]:
    return RunDir(str(out)).committed_steps(layout.TRAIN_CHECKPOINTS)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    succeeded(pipeline(*run_args(out)))
    return out


def copy_up_to_train(clean: Path, out: Path, max_failures: int, keep_checkpoints: int = 3) -> Path:
    """A copy of the clean run without its train, sample and report outputs (run with --force)."""
    from pipeline.core.config import to_toml
    from pipeline.runner import load_run_config

    shutil.copytree(clean, out, ignore=shutil.ignore_patterns("train", "sample", "report"))
    run = RunDir(str(out))
    config = load_run_config(run)
    update = {"max_failures": max_failures, "keep_checkpoints": keep_checkpoints}  # resumable: same fingerprint
    train = config.train.model_copy(update=update)
    run.write_text(layout.CONFIG, to_toml(config.model_copy(update={"train": train})))
    return out


def test_whole_run_killed_mid_encode_then_mid_train_resumes_to_the_clean_result(clean_run, tmp_path):
    out = tmp_path / "run"
    # 1. Killed once the first latent shard is published: ingest done, encode half done.
    run_until_fault_then_kill(run_args(out), {"point": "encode-shard", "action": "stop", "once": str(tmp_path / "f1")})
    assert stages(out)["ingest"]["status"] == "done" and stages(out)["encode"]["status"] == "running"
    ingest_finished = stages(out)["ingest"]["finished"]
    assert list((out / layout.ENCODE_PROGRESS / "shards").glob("*.json"))

    # 2. The same command: ingest skipped, encode resumed; killed again after step 6 of 8, past
    #    the checkpoint at step 4.
    fault = {"point": "train-step", "action": "stop", "rank": 0, "step": 6, "once": str(tmp_path / "f2")}
    run_until_fault_then_kill(run_args(out), fault)
    assert stages(out)["ingest"]["finished"] == ingest_finished
    assert stages(out)["encode"]["status"] == "done" and stages(out)["train"]["status"] == "running"
    resume = json.loads((out / layout.ENCODE_MANIFEST).read_text())["resume"]
    assert resume["kept_shards"] >= 1 and resume["kept_shards"] + resume["encoded_shards"] == 4, resume
    assert committed(out) == [4]

    # 2b. Rerun with a changed key: refused before anything runs, the checkpoint and config kept. Not
    #     "another driver holds ...": the killed driver's lease is taken over at once.
    config = (out / layout.CONFIG).read_text()
    refused = pipeline(*run_args(out), "--set", "train.lr=1e-4")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "stage 'train' would start over" in refused.stderr
    assert f"train.lr: {load_config('tiny').train.lr} -> 0.0001" in refused.stderr
    assert "--restart train" in refused.stderr and "--out" in refused.stderr
    assert committed(out) == [4] and (out / layout.CONFIG).read_text() == config
    assert stages(out)["train"]["status"] == "running"  # run.json untouched

    # 3. The same command once more finishes, from the step-4 checkpoint.
    succeeded(pipeline(*run_args(out)))
    assert stages(out)["train"]["resumed_from"] == [4]
    assert stages(out)["ingest"]["finished"] == ingest_finished
    assert all(entry["status"] == "done" for entry in stages(out).values())

    got, want = latents_by_key(out), latents_by_key(clean_run)
    assert got.keys() == want.keys() and len(got) == 240
    for key, (latent, text) in want.items():
        np.testing.assert_allclose(got[key][0], latent, atol=2e-3, err_msg=key)  # fp16, other batch splits
        np.testing.assert_allclose(got[key][1], text, atol=2e-3, err_msg=key)
    assert_same_training(out, clean_run)
    assert committed(out) == committed(clean_run) == [4, 8]


def test_a_killed_training_worker_is_restarted_by_ray_train_from_the_latest_checkpoint(clean_run, tmp_path):
    out = copy_up_to_train(clean_run, tmp_path / "run", max_failures=1)
    fault = {"point": "train-step", "action": "kill", "rank": 1, "step": 6, "once": str(tmp_path / "fired")}
    succeeded(pipeline("train", str(out), "--force", fault=fault))
    assert (tmp_path / "fired").exists()  # rank 1 did die at step 6
    assert stages(out)["train"]["resumed_from"] == [4]  # and the restarted group resumed from step 4
    assert_same_training(out, clean_run)


def test_a_rank_killed_mid_checkpoint_never_leaves_a_half_checkpoint_to_resume_from(clean_run, tmp_path):
    out = copy_up_to_train(clean_run, tmp_path / "run", max_failures=0)
    # Rank 1 dies with its step-8 files written locally, before its upload.
    fault = {"point": "checkpoint-files", "action": "kill", "rank": 1, "step": 8, "once": str(tmp_path / "fired")}
    result = pipeline("train", str(out), "--force", fault=fault)
    assert result.returncode != 0 and stages(out)["train"]["status"] == "failed"
    assert committed(out) == [4]
    # What an upload cut between files leaves: rank 0's part, the train state and DeepSpeed's own
    # `latest` tag file, no COMMITTED.
    half = out / layout.TRAIN_CHECKPOINTS / LAST
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(
        clean_run / layout.TRAIN_CHECKPOINTS / LAST, half, ignore=shutil.ignore_patterns("*rank_1*", layout.COMMIT_MARKER)
    )
    assert (half / "latest").exists() and (half / "train_state.json").exists()

    succeeded(pipeline("train", str(out)))
    assert stages(out)["train"]["resumed_from"] == [4]  # the half checkpoint was never picked
    assert_same_training(out, clean_run)
    assert committed(out) == [4, 8]


def written(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under `folder` by its inode and modification time: what a rewrite would change."""
    return {str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def test_rank_zero_killed_before_the_commit_marker_leaves_the_previous_checkpoint_in_charge(clean_run, tmp_path):
    # keep_checkpoints = 1: the step-4 checkpoint may go only once step 8 is committed (Ray Train's
    # own retention removed it when it registered step 8's report, before the marker).
    out = copy_up_to_train(clean_run, tmp_path / "run", max_failures=0, keep_checkpoints=1)
    # Every rank has uploaded its step-8 files and reported them; rank 0 dies before COMMITTED, 8 s
    # later: Ray Train's controller (polling every 2 s) has registered step 8's report by then.
    fault = {"point": "checkpoint-commit", "action": "kill", "step": 8, "delay_s": 8, "once": str(tmp_path / "fired")}
    assert pipeline("train", str(out), "--force", fault=fault).returncode != 0
    assert committed(out) == [4] and (out / layout.TRAIN_CHECKPOINTS / LAST / "train_state.json").exists()
    # The step-8 export was committed before the checkpoint: the rerun must keep it, not rewrite it.
    export = out / layout.TRAIN_EXPORT / LAST
    assert (export / layout.COMMIT_MARKER).exists()
    exported = written(export)

    succeeded(pipeline("train", str(out)))
    assert stages(out)["train"]["resumed_from"] == [4]  # uncommitted: not trusted, redone
    assert committed(out) == [8]  # step 4 pruned once step 8 was committed
    assert written(export) == exported
    assert_same_training(out, clean_run)


def test_a_killed_encode_actor_is_replaced_and_every_sample_is_encoded_once(clean_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out, ignore=shutil.ignore_patterns("encode", "train", "sample", "report"))
    fault = {"point": "encode-batch", "action": "kill", "once": str(tmp_path / "fired")}
    succeeded(pipeline("encode", str(out), "--force", fault=fault))
    assert (tmp_path / "fired").exists()
    manifest = json.loads((out / layout.ENCODE_MANIFEST).read_text())
    assert manifest["samples"] == manifest["raw_samples"] == 240
    got, want = latents_by_key(out), latents_by_key(clean_run)  # raises on a key seen twice
    assert got.keys() == want.keys()
