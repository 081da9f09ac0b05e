"""Fewer latent shards than training workers: a clear error before any worker starts, and
never a hang in a collective if the workers get that far.

The order deals whole shards (one per raw shard, its parts merged) to data streams, one per
worker by default, so the bound is shards >= streams. More shards than streams rebalance per
epoch: the remainder sits out, counted as dropped
(tests/train/test_order.py::test_remainder_shards_and_uneven_tails_are_dropped_and_counted).
One plain shard for two workers: tests/train/test_stage.py::test_too_few_shards_fails_before_any_worker_starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_latents import write_latent_run

from pipeline.core import layout
from pipeline.core.config import load_config
from train import stage
from train.stage import TrainStageError, run_stage


def config(workers: int = 2):
    return load_config(
        "tiny",
        overrides=[
            f"train.num_workers={workers}",
            "train.cpus_per_worker=0.5",
            "train.batch_size_per_worker=4",
            "train.max_steps=2",
            "train.warmup_steps=0",
            "train.max_failures=0",
        ],
    )


def as_parts(run, groups: list[list[str]]) -> None:
    """Rename the latent tars to parts of raw shards, as encode's write tasks name them:
    groups[i] lists the tars that become parts of raw shard i."""
    names = []
    for raw, tars in enumerate(groups):
        for part, tar in enumerate(tars):
            name = f"{raw:05d}-{part:08x}.tar"
            Path(run.path(f"{layout.ENCODE_SHARDS}/{tar}")).rename(run.path(f"{layout.ENCODE_SHARDS}/{name}"))
            names.append(name)
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    counts = {entry["name"]: entry["samples"] for entry in manifest["latent_shards"]}
    entries = [
        {
            "name": f"{raw:05d}",
            "parts": [n for n in names if n.startswith(f"{raw:05d}-")],
            "samples": sum(counts[t.removesuffix(".tar")] for t in tars),
        }
        for raw, tars in enumerate(groups)
    ]
    run.write_json(layout.ENCODE_MANIFEST, {**manifest, "shards": names, "latent_shards": entries})


@pytest.fixture
def no_workers(monkeypatch):
    """Starting Ray Train's workers fails the test: the error must come first."""
    import ray.train.torch

    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a worker group was about to start")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Refused)


@pytest.mark.timeout(60)
def test_one_raw_shard_written_in_two_parts_fails_before_any_worker_starts(tmp_path, no_workers):
    run = write_latent_run(tmp_path / "run", shards=2, per_shard=8)
    as_parts(run, [["00000.tar", "00001.tar"]])  # two tars, but one shard to training
    with pytest.raises(TrainStageError, match=r"1 latent shard\(s\) for 2 data streams") as error:
        run_stage(config(2), run)
    assert "lower ingest.samples_per_shard" in str(error.value) and "fewer workers" in str(error.value)


@pytest.mark.timeout(60)
def test_as_many_raw_shards_as_workers_pass_the_check(tmp_path):
    run = write_latent_run(tmp_path / "run", shards=3, per_shard=8)
    as_parts(run, [["00000.tar", "00001.tar"], ["00002.tar"]])
    stage.check_inputs(config(2), run)  # no error
    with pytest.raises(TrainStageError, match=r"2 latent shard\(s\)"):
        stage.check_inputs(config(3), run)


@pytest.mark.e2e  # real Ray Train workers (about 25 s): `make test-e2e` runs it
@pytest.mark.timeout(300)
def test_workers_given_too_few_shards_fail_together_instead_of_hanging(tmp_path, ray_local, monkeypatch):
    """Past the driver's check (bypassed here), every rank raises the same error in setup,
    before its first collective: the stage fails, it does not wait forever."""
    run = write_latent_run(tmp_path / "run", shards=1, per_shard=8)
    monkeypatch.setattr(stage, "check_inputs", lambda config, run: {})  # check_inputs returns the UNet summary
    with pytest.raises(TrainStageError, match=r"1 latent shard\(s\) for 2 data streams"):
        run_stage(config(2), run)
