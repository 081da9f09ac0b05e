"""Class-conditional mode end to end with the real components (`pipeline run` on the tiny preset,
shapes as classes): labels reach the latent shards, the UNet trains with a class embedding, the
export says which classes it knows, and validation measures shape accuracy per guidance scale."""

import json
import tarfile

import pytest
from run_contract import SMALL, pipeline, set_args
from safetensors import safe_open

from pipeline.core import layout

# An end-to-end run of `make test-e2e`, not of `make test` (which runs tests/e2e/test_end_to_end.py only).
pytestmark = pytest.mark.e2e

CLASS_MODE = ["train.conditioning=class", "encode.class_field=shape"]
SHAPES = ["circle", "square", "triangle"]


def test_class_conditional_run(tmp_path):
    out = tmp_path / "run"
    result = pipeline("run", "--preset", "tiny", "--out", str(out), *set_args(SMALL + CLASS_MODE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    manifest = json.loads((out / layout.ENCODE_MANIFEST).read_text())
    assert manifest["classes"] == SHAPES and manifest["class_field"] == "shape" and manifest["skipped_unlabelled"] == 0
    labelled = 0
    for path in sorted((out / layout.ENCODE_SHARDS).glob("*.tar")):
        with tarfile.open(path) as archive:
            members = {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}
        for name, data in members.items():
            if name.endswith(f".{layout.CLASS_KEY}"):
                meta = json.loads(members[name.removesuffix(layout.CLASS_KEY) + layout.META_KEY])
                assert SHAPES[int(data)] == meta["shape"]  # the toy shape travelled from the URL list
                labelled += 1
    assert labelled == manifest["samples"] == 240

    export = out / layout.TRAIN_EXPORT / layout.step_name(8)
    assert json.loads((export / layout.EXPORT_CLASSES).read_text()) == {
        "conditioning": "class",
        "class_field": "shape",
        "classes": SHAPES,
        "null_class": 3,
    }
    assert json.loads((export / layout.EXPORT_UNET / "config.json").read_text())["num_class_embeds"] == 4
    with safe_open(str(export / layout.EXPORT_UNET / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert weights.get_tensor("class_embedding.weight").shape[0] == 4

    validation = json.loads((out / layout.SAMPLE_VALIDATION).read_text())
    assert [entry["step"] for entry in validation["checkpoints"]] == [4, 8]
    for entry in validation["checkpoints"]:
        assert entry["conditioning"] == "class" and entry["conditions"] == SHAPES
        assert set(entry["metrics"]["shape_accuracy"]) == {"0", "1", "3", "7.5"}
        assert "prompt_accuracy" not in entry["metrics"]
    assert "shape_accuracy" in validation["best"]
    assert "Shape accuracy" in (out / layout.REPORT_INDEX).read_text()

    pngs = tmp_path / "pngs"
    result = pipeline("sample", str(out), "--class", "triangle", "--steps", "2", "--out", str(pngs), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in pngs.iterdir()] == ["000-triangle-seed0.png"]
