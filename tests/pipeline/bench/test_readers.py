"""`pipeline bench readers`: the wids description from the manifest, how a reader's runs are summed
up, and our reader's and wids' resume landing on the batch the uninterrupted epoch had there
(mosaicml-streaming is not installed by `make install`, so its reader is not run here)."""

import json
from pathlib import Path

import pytest

from pipeline.bench.readers import child_main, ratios, reader_result, wids_descriptor
from pipeline.bench.train import write_synthetic_latents
from pipeline.core import layout
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir


def test_wids_descriptor_lists_every_tar_with_its_count(tmp_path):
    manifest = {"latent_shards": [{"name": "00000", "samples": 7}]}
    assert wids_descriptor(manifest, tmp_path) == {
        "wids_version": 1,
        "name": "latents",
        "shardlist": [{"url": str(tmp_path / "00000.tar"), "nsamples": 7}],
    }


def _epoch(rate: float, keys: list[str]) -> dict:
    return {
        "samples_per_s": rate,
        "first_batch_s": 1.0,
        "import_s": 0.1,
        "peak_rss_mb": 300.0,
        "reader_rss_mb": 50.0,
        "resume_keys": keys,
    }


def _resume(seconds: float, keys: list[str]) -> dict:
    return {"first_batch_s": seconds, "peak_rss_mb": 290.0, "resume_keys": keys}


def test_reader_result_takes_the_best_run_and_checks_every_resume():
    result = reader_result([(_epoch(100.0, ["a"]), _resume(2.0, ["a"])), (_epoch(120.0, ["a"]), _resume(1.5, ["a"]))])
    assert result["samples_per_s"] == 120.0 and result["samples_per_s_runs"] == [100.0, 120.0]
    assert result["resume_first_batch_s"] == 1.5 and result["resume_exact"] is True and "resume_keys" not in result
    assert reader_result([(_epoch(100.0, ["a"]), _resume(2.0, ["b"]))])["resume_exact"] is False
    assert reader_result([(_epoch(100.0, ["a"]), {"error": "ImportError: no streaming"})]) == {
        "error": "ImportError: no streaming"
    }


def test_ratios_are_each_reader_over_ours_and_skip_errors():
    ours = reader_result([(_epoch(100.0, ["a"]), _resume(2.0, ["a"]))])
    other = {**ours, "samples_per_s": 250.0, "resume_first_batch_s": 0.5}
    table = ratios({"ours": ours, "wids": other, "mosaic": {"error": "not installed"}})
    assert list(table) == ["wids"]
    assert table["wids"]["samples_per_s"] == 2.5 and table["wids"]["resume_first_batch_s"] == 0.25
    assert table["wids"]["peak_rss_mb"] == 1.0


@pytest.mark.parametrize("reader", ["ours", "wids"])
def test_a_resume_reads_the_batch_the_epoch_had_at_that_step(tmp_path, reader):
    run = RunDir(tmp_path / "run")
    assert write_synthetic_latents(load_config("tiny"), run, 256) == 2  # 2 shards of 128
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    wids_path = tmp_path / "wids.json"
    wids_path.write_text(json.dumps(wids_descriptor(manifest, Path(run.path(layout.ENCODE_SHARDS)))))
    # Shuffle windows of one shard: the resume at step 4 (sample 128) starts the second window.
    job = {"run": str(run.root), "wids": str(wids_path), "mds": "", "seed": 0, "batch": 32, "window": 1}
    job |= {"shuffle_samples": 128, "steps": 8, "resume_step": 4, "reader": reader}

    epoch = child_main({**job, "phase": "epoch"})
    resume = child_main({**job, "phase": "resume"})
    assert epoch["batches"] == 8 and epoch["distinct_samples"] == 256 and resume["batches"] == 1
    assert len(epoch["resume_keys"]) == 32 and resume["resume_keys"] == epoch["resume_keys"]
    assert epoch["samples_per_s"] > 0 and epoch["first_batch_s"] > 0 and epoch["peak_rss_mb"] > 0
