"""The sample stage on a synthetic run directory: tiny random exports, a real encode manifest."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image
from sample_support import PROMPTS, encode_manifest, export_step, sample_config

from pipeline.core import layout, models
from pipeline.core.identity import EncoderMismatchError
from pipeline.core.rundir import RunDir
from sample.validate import stage as validate


def test_validates_every_committed_export_and_writes_grids(synthetic_run, model_dirs, tmp_path):
    # An export without its commit marker (a crash mid-export) does not count.
    (tmp_path / "run" / layout.TRAIN_EXPORT / layout.step_name(30) / "unet").mkdir(parents=True)
    summary = validate.run_stage(sample_config(model_dirs), synthetic_run)
    assert summary["validated"] == [10, 20]
    assert summary["counts"] == {"checkpoints": 2, "newly_validated": 2, "images": 2 * 2 * 2 * 3, "validated_during_training": 0}

    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    assert set(validation) == {"checkpoints", "best"}
    assert [entry["step"] for entry in validation["checkpoints"]] == [10, 20]
    for entry in validation["checkpoints"]:
        assert entry["prompts"] == PROMPTS
        assert entry["seeds"] == [0, 1]
        assert entry["guidance_scales"] == [0.0, 1.0, 7.5]
        assert (entry["scheduler"], entry["steps"]) == ("ddim", 2)
        accuracy = entry["metrics"]["prompt_accuracy"]
        assert set(accuracy) == {"0", "1", "7.5"}
        assert all(value in (0.0, 0.25, 0.5, 0.75, 1.0) for value in accuracy.values())  # 2 prompts x 2 seeds
        assert entry["seconds"] > 0
        assert set(entry["images"]) == {"0", "1", "7.5"}
        for key, path in entry["images"].items():
            assert path == f"sample/images/{layout.step_name(entry['step'])}/guidance-{key}.png"
            grid = Image.open(io.BytesIO(synthetic_run.read_bytes(path)))
            assert grid.mode == "RGB" and grid.width >= 2 * 16 and grid.height >= 2 * 16
    best = validation["best"]
    assert set(best) == {"step", "guidance_scale", "prompt_accuracy"}
    assert best["prompt_accuracy"] == max(
        value for entry in validation["checkpoints"] for value in entry["metrics"]["prompt_accuracy"].values()
    )
    assert summary["best"] == best


def test_is_incremental(synthetic_run, model_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    validate.run_stage(sample_config(model_dirs), synthetic_run)
    before = synthetic_run.read_text(layout.SAMPLE_VALIDATION)

    assert validate.run_stage(sample_config(model_dirs), synthetic_run)["validated"] == []
    assert synthetic_run.read_text(layout.SAMPLE_VALIDATION) == before
    assert "already validated" in caplog.text

    export_step(synthetic_run, 30, tmp_path)
    assert validate.run_stage(sample_config(model_dirs), synthetic_run)["validated"] == [30]
    steps = [entry["step"] for entry in synthetic_run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"]]
    assert steps == [10, 20, 30]

    # Other sampling settings make the old entries stale: every checkpoint is validated again.
    summary = validate.run_stage(sample_config(model_dirs, scheduler="euler", guidance_scales=[3.0]), synthetic_run)
    assert summary["validated"] == [10, 20, 30]
    entries = synthetic_run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"]
    assert [(e["scheduler"], list(e["images"])) for e in entries] == [("euler", ["3"])] * 3


def test_without_judge_there_is_no_accuracy(synthetic_run, model_dirs):
    validate.run_stage(sample_config(model_dirs, judge="none", guidance_scales=[2.0]), synthetic_run)
    validation = synthetic_run.read_json(layout.SAMPLE_VALIDATION)
    assert validation["best"] is None
    assert all(entry["metrics"] == {} and list(entry["images"]) == ["2"] for entry in validation["checkpoints"])


def test_refuses_a_text_encoder_other_than_the_manifests(synthetic_run, model_dirs):
    manifest = synthetic_run.read_json(layout.ENCODE_MANIFEST)
    manifest["text_encoder"]["weights_sha256"] = "0" * 64
    synthetic_run.write_json(layout.ENCODE_MANIFEST, manifest)
    with pytest.raises(EncoderMismatchError) as error:
        validate.run_stage(sample_config(model_dirs), synthetic_run)
    message = str(error.value)
    assert "text_encoder" in message and "0" * 64 in message
    actual = models.weights_sha256(models.load_text_encoder(str(model_dirs["text_encoder"])))
    assert actual in message
    assert not synthetic_run.exists(layout.SAMPLE_VALIDATION)


def test_refuses_a_configured_vae_that_did_not_make_the_latents(synthetic_run, model_dirs, tmp_path):
    """The manifest is right; the config names a VAE with other weights: sampling refuses it."""
    vae = models.load_vae(str(model_dirs["vae"]))
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 0.01
    vae.save_pretrained(tmp_path / "other-vae")
    configured = models.weights_sha256(vae)
    recorded = synthetic_run.read_json(layout.ENCODE_MANIFEST)["vae"]["weights_sha256"]
    assert configured != recorded

    with pytest.raises(EncoderMismatchError) as error:
        validate.run_stage(sample_config({**model_dirs, "vae": tmp_path / "other-vae"}), synthetic_run)
    message = str(error.value)
    for expected in (str(model_dirs["vae"]), recorded, str(tmp_path / "other-vae"), configured):
        assert expected in message
    assert "text_encoder" not in message
    assert not synthetic_run.exists(layout.SAMPLE_VALIDATION)


def test_refuses_prompts_the_toy_judge_cannot_read(synthetic_run, model_dirs):
    with pytest.raises(ValueError, match=r"sample.prompts\[1\] = 'a photo of a cat'"):
        validate.run_stage(sample_config(model_dirs, prompts=[PROMPTS[0], "a photo of a cat"]), synthetic_run)


def test_nothing_to_do_without_exports(tmp_path):
    summary = validate.run_stage(sample_config(), RunDir(tmp_path / "empty-run"))
    assert summary["validated"] == [] and summary["counts"]["checkpoints"] == 0


def test_best_prefers_accuracy_then_the_later_step():
    checkpoints = [
        {"step": 10, "metrics": {"prompt_accuracy": {"0": 0.1, "3": 0.5}}},
        {"step": 20, "metrics": {"prompt_accuracy": {"0": 0.2, "3": 0.5, "7.5": 0.4}}},
    ]
    assert validate.best_of(checkpoints) == {"step": 20, "guidance_scale": 3.0, "prompt_accuracy": 0.5}
    assert validate.best_of([{"step": 1, "metrics": {}}]) is None
    assert [validate.scale_key(s) for s in (0.0, 1.0, 3.0, 7.5, 12.25)] == ["0", "1", "3", "7.5", "12.25"]


BUILTIN = models.ASSETS_DIR
needs_builtin = pytest.mark.skipif(
    not all((BUILTIN / name).is_dir() for name in ("vae", "text_encoder", "tokenizer")),
    reason="shipped tiny models (pipeline/core/assets/tiny/{vae,text_encoder}) not made yet: run scripts/make_tiny_models.py",
)


@needs_builtin
def test_runs_on_the_shipped_builtin_models(tmp_path):
    run = RunDir(tmp_path / "run")
    manifest = encode_manifest("builtin:tiny-vae", "builtin:tiny-text-encoder", "builtin:clip-tokenizer")
    run.write_json(layout.ENCODE_MANIFEST, manifest)
    from diffusers import UNet2DConditionModel
    from sample_support import training_scheduler

    channels, side, _ = manifest["latent_shape"]
    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=manifest["text_embedding_shape"][1],
        attention_head_dim=4,
        norm_num_groups=8,
    )
    unet.save_pretrained(tmp_path / "export" / "unet")
    training_scheduler().save_pretrained(tmp_path / "export" / "scheduler")
    run.put_dir(tmp_path / "export", f"{layout.TRAIN_EXPORT}/{layout.step_name(5)}")
    summary = validate.run_stage(sample_config(seeds=[0], guidance_scales=[3.0]), run)
    assert summary["validated"] == [5]
    grid = Image.open(io.BytesIO(run.read_bytes(f"{layout.SAMPLE_IMAGES}/{layout.step_name(5)}/guidance-3.png")))
    assert grid.width >= manifest["resolution"]
