"""The sample stage with CLIP score and FID configured: values per guidance scale in validation.json,
the FID reference cached in the run, both in the report; skipped metrics noted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sample_support import sample_config

from pipeline.core import layout
from sample import fid
from sample.metrics import FID_REFERENCE_CACHE
from sample.report import stage as report
from sample.validate import stage as validate


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random FID-Inception weights (He init, so features do not vanish) saved as safetensors."""
    torch.manual_seed(0)
    model = fid.FIDInception()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_clip_score_and_fid_per_guidance_scale(synthetic_run, model_dirs, clip_dir, inception_file):
    # Toy source without fid_reference: held-out toy images drawn with another seed are the reference.
    config = sample_config(
        model_dirs, clip_model=str(clip_dir), fid_inception=str(inception_file), fid_reference_count=4, guidance_scales=[0.0, 7.5]
    )
    validate.run_stage(config, synthetic_run)
    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    for entry in validation["checkpoints"]:
        assert entry["skipped_metrics"] == {}
        assert set(entry["metrics"]) == {"prompt_accuracy", "shape_accuracy", "clip_score", "fid"}
        for key in ("0", "7.5"):
            assert 0 <= entry["metrics"]["clip_score"][key] <= 100
            assert np.isfinite(entry["metrics"]["fid"][key]) and entry["metrics"]["fid"][key] > 0
        assert entry["clip_model"] == str(clip_dir) and entry["fid_inception"] == str(inception_file)
    cached = np.load(synthetic_run.path(FID_REFERENCE_CACHE))
    assert cached["features"].shape == (4, 2048)

    validate.run_stage(sample_config(model_dirs, guidance_scales=[0.0, 7.5]), synthetic_run)  # metrics unset: stale
    entries = synthetic_run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"]
    judged = {"prompt_accuracy", "shape_accuracy"}
    assert all(set(e["metrics"]) == judged and set(e["skipped_metrics"]) == {"clip_score", "fid"} for e in entries)

    page = report.render(config, synthetic_run)
    assert "CLIP score skipped" in page and "FID skipped" in page


def test_report_plots_clip_score_and_fid(synthetic_run, model_dirs):
    validate.run_stage(sample_config(model_dirs, guidance_scales=[0.0, 7.5]), synthetic_run)
    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    for index, entry in enumerate(validation["checkpoints"]):
        entry["metrics"]["clip_score"] = {"0": 20.0 + index, "7.5": 25.0 + index}
        entry["metrics"]["fid"] = {"0": 90.0 - index, "7.5": 80.5 - index}
        entry["skipped_metrics"] = {}
    synthetic_run.write_json(layout.SAMPLE_VALIDATION, validation)
    page = report.render(None, synthetic_run)
    without = page.count("<img ")
    assert "<h3>CLIP score</h3>" in page and "<h3>FID</h3>" in page
    assert "80.500" in page and "lower is better" in page and "skipped" not in page
    assert "FID 79.50" in page  # in the grid captions too
    del validation["checkpoints"][0]["metrics"]["fid"], validation["checkpoints"][1]["metrics"]["fid"]
    synthetic_run.write_json(layout.SAMPLE_VALIDATION, validation)
    assert report.render(None, synthetic_run).count("<img ") == without - 1
