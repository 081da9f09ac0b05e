"""Elastic resume on a real Ray Train + DeepSpeed run: 2 workers, then 1 (a lost node), then 2 again,
in one run directory. The checkpoint is resharded (DeepSpeed's universal form, the EMA by us) and the
data order goes on from its world-size-independent position: over the epoch every sample is trained
on exactly once (the keys each rank recorded, train.record_samples)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from synthetic_latents import write_latent_run

from pipeline.core import layout
from pipeline.core.config import load_config
from train.checkpoint import UNIVERSAL_TAG
from train.stage import run_stage

pytestmark = pytest.mark.e2e


def config(workers: int, max_steps: int, zero_stage: int):
    return load_config(
        "tiny",
        overrides=[
            f"train.num_workers={workers}",
            "train.cpus_per_worker=0.5",
            f"train.zero_stage={zero_stage}",
            "train.batch_size_per_worker=8",
            "train.warmup_steps=0",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=6",
            "train.record_samples=true",
            f"train.max_steps={max_steps}",
        ],
    )


def recorded_keys(run, epoch: int) -> Counter:
    """Keys trained on in `epoch`, over every rank's files; a step recorded twice (redone after a
    resume) counts once, as the last recording of it."""
    by_step: dict[tuple[str, int], list[str]] = {}
    for name in run.list(layout.TRAIN_SAMPLES, ".jsonl"):
        rank = name.rsplit("-rank-", 1)[1]
        for line in run.read_text(f"{layout.TRAIN_SAMPLES}/{name}").splitlines():
            row = json.loads(line)
            if row["epoch"] == epoch:
                by_step[(rank, row["step"])] = row["keys"]
    return Counter(key for keys in by_step.values() for key in keys)


# ZeRO-3 only: ZeRO-2's universal form is resharded by tests/train/test_finetune.py's LoRA run (2 workers, then 1).
@pytest.mark.parametrize("zero_stage", [3])
def test_two_workers_then_one_then_two_see_every_sample_of_the_epoch_once(tmp_path, ray_local, zero_stage):
    # 4 shards of 32 samples in 2 streams of 64: 16 samples a step with 2 workers, 8 with 1.
    run = write_latent_run(tmp_path / "run", shards=4, per_shard=32)
    assert run_stage(config(2, 2, zero_stage), run)["steps"] == 2  # 32 samples: 16 of each stream
    assert run_stage(config(1, 8, zero_stage), run)["steps"] == 8  # 48 more: 40 of each stream
    summary = run_stage(config(2, 11, zero_stage), run)  # the epoch's last 3 steps: 64 of each stream
    assert summary["steps"] == 11 and summary["final_loss"] > 0

    seen = recorded_keys(run, epoch=0)
    assert len(seen) == 4 * 32 and set(seen.values()) == {1}
    resumes = run.read_json(layout.TRAIN_RESUMES)
    assert [(entry["step"], entry["workers"]) for entry in resumes] == [(2, [2, 1]), (8, [1, 2])]
    for step in (2, 8):  # each written by the other world size, so made universal before its resume
        assert run.exists(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(step)}/{UNIVERSAL_TAG}/{layout.COMMIT_MARKER}")
    assert not run.exists(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(10)}/{UNIVERSAL_TAG}")  # resumed by none
