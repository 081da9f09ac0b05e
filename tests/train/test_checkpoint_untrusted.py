"""A planted checkpoint never runs code (train.safe_load): DeepSpeed's files are loaded with
`torch.load(weights_only=True)` and an allowlist of its plain state classes, on resume and when
`make_universal` converts a checkpoint. The payload is a pickle whose `__reduce__` calls
`os.system("touch MARKER")`; every test asserts MARKER was never created.

Resuming needs a real DeepSpeed engine, so it runs in a child process (a one-rank process group,
kept out of the test process): this file, run as a script.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from train.checkpoint import DEEPSPEED_TAG, STATE_FILE, make_universal
from train.safe_load import UnsafeCheckpointError, weights_only_loads


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file: Path, marker: Path) -> None:
    torch.save({"module": Payload(marker)}, file)


def committed_folder(run: RunDir, step: int) -> str:
    relative = f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(step)}"
    run.write_json(f"{relative}/{STATE_FILE}", {"step": step, "world_size": 1})
    run.write_text(f"{relative}/{layout.COMMIT_MARKER}", "t\n")
    return relative


def test_a_payload_is_refused_naming_the_file_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "model_states.pt", marker)
    with weights_only_loads(), pytest.raises(UnsafeCheckpointError) as error:
        torch.load(tmp_path / "model_states.pt", map_location="cpu", weights_only=False)  # as DeepSpeed calls it
    assert str(tmp_path / "model_states.pt") in str(error.value) and "system" in str(error.value)
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # put back


def test_make_universal_never_unpickles_a_planted_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    run = RunDir(tmp_path / "run")
    relative = committed_folder(run, 6)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        run.makedirs(f"{relative}/{DEEPSPEED_TAG}")
        plant(Path(run.path(f"{relative}/{DEEPSPEED_TAG}/{name}")), marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{run.path(relative)}/{DEEPSPEED_TAG}/.*\\.pt is not a DeepSpeed"):
        make_universal(run, world=2)
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_resuming_from_a_planted_checkpoint_is_refused_and_a_real_one_resumes(tmp_path):
    """A real ZeRO-2 checkpoint resumes under weights_only=True; a newer committed one with a
    payload in place of DeepSpeed's model states is refused, naming the file, and never runs."""
    marker = tmp_path / "ran"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "run"), str(marker)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["resumed"] == 1  # the real checkpoint, loaded with the allowlist alone
    planted = str(
        tmp_path / "run" / layout.TRAIN_CHECKPOINTS / layout.step_name(2) / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    )
    assert result["error"].startswith(f"{planted} is not a DeepSpeed checkpoint file"), result["error"]
    assert "posix.system" in result["error"] or "os.system" in result["error"]
    assert not marker.exists()


def _child(run_url: str, marker: str) -> None:
    """Save a one-step ZeRO-2 checkpoint, resume it, then plant a newer one and resume again."""
    import deepspeed

    from pipeline.core.config import load_config
    from train.checkpoint import resume
    from train.engine import make_engine
    from train.unet import build_unet

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config("tiny", overrides=["train.zero_stage=2", "train.batch_size_per_worker=2", "train.warmup_steps=0"]).train

    def engine():
        torch.manual_seed(0)
        return make_engine(build_unet(config.unet, 32, 8), config)

    run = RunDir(run_url)
    first = engine()
    loss = first(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 77, 32)).sample.pow(2).mean()
    first.backward(loss)
    first.step()
    relative = committed_folder(run, 1)
    first.save_checkpoint(run.path(relative), tag=DEEPSPEED_TAG)
    resumed = resume(engine(), run).step

    newer = committed_folder(run, 2)
    shutil.copytree(run.path(f"{relative}/{DEEPSPEED_TAG}"), run.path(f"{newer}/{DEEPSPEED_TAG}"))
    plant(Path(run.path(f"{newer}/{DEEPSPEED_TAG}/mp_rank_00_model_states.pt")), marker)
    try:
        resume(engine(), run)
        error = None
    except UnsafeCheckpointError as refused:
        error = str(refused)
    print(json.dumps({"resumed": resumed, "error": error}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
