"""The HTML report: self-contained (no network references), one <img> per grid, notes for gaps."""

from __future__ import annotations

import json
import re

from sample_support import sample_config

from pipeline.core import layout
from pipeline.core.config import to_toml
from pipeline.core.rundir import RunDir
from sample.report import stage as report
from sample.validate import stage as validate

REMOTE_REFERENCE = re.compile(
    r"""(?:src|href|srcset)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""", re.IGNORECASE
)


def fill_other_stages(run: RunDir, config) -> None:
    """What the other stages leave behind: run.json, config.toml, train/metrics.jsonl."""
    run.write_text(layout.CONFIG, to_toml(config) + '# <script>alert("not escaped")</script>\n')
    stages = {
        "ingest": {
            "status": "done",
            "started": "2026-01-01T00:00:00+00:00",
            "finished": "2026-01-01T00:00:09+00:00",
            "seconds": 9.2,
            "counts": {"succeeded": 3000, "failed": 2},
        },
        "encode": {"status": "done", "seconds": 20.0, "samples": 2998},
        "train": {"status": "done", "seconds": 300.5, "steps": 20},
        "sample": {"status": "running"},
    }
    run.write_json(layout.RUN_MANIFEST, {"stages": stages})
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5, "samples_per_s": 200.0}) for s in range(1, 41)]
    run.write_text(layout.TRAIN_METRICS, "\n".join(lines) + '\n{"step": 41, "lo')  # torn last line


def test_report_is_self_contained_with_one_image_per_grid(synthetic_run, model_dirs):
    config = sample_config(model_dirs)
    validate.run_stage(config, synthetic_run)
    fill_other_stages(synthetic_run, config)
    summary = report.run_stage(config, synthetic_run)

    page = synthetic_run.read_text(layout.REPORT_INDEX)
    assert summary["path"] == layout.REPORT_INDEX
    assert not REMOTE_REFERENCE.search(page)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]*\ssrc="([^"]*)"', page))

    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    grids = [(e["step"], key) for e in validation["checkpoints"] for key in e["images"]]
    assert len(grids) == 6
    assert page.count('<img class="grid"') == len(grids)
    for step, key in grids:
        assert f"step {step}, guidance {key}" in page
    # Loss curve, learning rate, then prompt and shape accuracy each vs step and vs guidance: six plots.
    assert page.count("<img ") == len(grids) + 6
    assert "shape accuracy vs guidance scale" in page
    assert "&lt;script&gt;alert(&quot;not escaped&quot;)&lt;/script&gt;" in page
    assert "<script>" not in page
    assert "Best: step" in page
    for stage in ("ingest", "encode", "train", "sample"):
        assert f"<td>{stage}</td>" in page
    assert "counts.succeeded: 3000" in page
    manifest = synthetic_run.read_json(layout.ENCODE_MANIFEST)
    assert manifest["vae"]["weights_sha256"] in page and manifest["text_encoder"]["id"] in page


def test_report_on_an_empty_run_renders_notes(tmp_path):
    run = RunDir(tmp_path / "fresh")
    summary = report.run_stage(None, run)
    page = run.read_text(layout.REPORT_INDEX)
    assert summary["counts"]["images"] == 0
    for missing in (layout.RUN_MANIFEST, layout.TRAIN_METRICS, layout.SAMPLE_VALIDATION, layout.ENCODE_MANIFEST, layout.CONFIG):
        assert missing in page
    assert "<img" not in page


def test_sample_and_report_run_through_the_pipeline_runner(synthetic_run, model_dirs):
    """The runner merges each stage's summary into run.json and skips both on a second run."""
    from pipeline import runner

    config = sample_config(model_dirs)
    chain = runner.fingerprints(config)
    for name in ("ingest", "encode", "train"):
        synthetic_run.update_stage(name, status="done", fingerprint=chain[name][0], base_fingerprint=chain[name][1], seconds=1.0)
    runner.run_stages(config, synthetic_run, ["sample", "report"])
    stages = synthetic_run.manifest()["stages"]
    assert stages["sample"]["status"] == "done" and stages["sample"]["validated"] == [10, 20]
    # The grids, then prompt and shape accuracy each vs step and vs guidance (no training metrics here).
    assert stages["report"]["status"] == "done" and stages["report"]["counts"]["images"] == 6 + 4
    assert synthetic_run.exists(layout.REPORT_INDEX)
