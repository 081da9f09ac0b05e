"""A text-conditional export is a whole diffusers pipeline folder: `StableDiffusionPipeline.from_pretrained`
loads it and draws what `pipeline sample` draws for the same seeds, with the builtin tiny encoders and with
foreign `save_pretrained` ones; the encoders are saved once per run and shared into every export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from sample_support import PROMPTS, encode_manifest, sample_config, tiny_unet

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from sample import export, generate
from sample.guidance import Sampling
from train.checkpoint import export_model
from train.unet import build_unet

STEPS = (4, 8)


def exported_run(tmp_path, config, unet) -> RunDir:
    """A run with its encode manifest and two exports of `unet`, written as the train stage writes them."""
    run = RunDir(tmp_path / "run")
    encode = config.encode
    manifest = {**encode_manifest(encode.vae, encode.text_encoder, encode.tokenizer), "samples": 1200, "latent_shard_count": 5}
    run.write_json(layout.ENCODE_MANIFEST, manifest)
    for step in STEPS:
        export_model(SimpleNamespace(module=unet), run, config.train, step, pipeline=config)
    return run


@pytest.mark.parametrize("encoders", ["builtin", "foreign"])
def test_from_pretrained_draws_what_pipeline_sample_draws(tmp_path, model_dirs, encoders):
    config = sample_config(model_dirs if encoders == "foreign" else None, scheduler="dpmsolver++", steps=4)
    assert config.sample.guidance_rescale > 0 and config.sample.timestep_spacing == "trailing"  # the defaults travel too
    if encoders == "foreign":
        unet, resolution = tiny_unet(), 16
    else:  # the tiny preset's UNet on the builtin encoders: 64 px, 8x8 latents, 64-wide text
        unet, resolution = build_unet("tiny", cross_attention_dim=64, sample_size=8), 64
    run = exported_run(tmp_path, config, unet)
    folder = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(STEPS[-1])}")

    seeds = [3, 11]
    checkpoint = export.load_checkpoint(run, config, STEPS[-1], str(tmp_path / "scratch"), torch.device("cpu"))
    sample = config.sample
    sampling = Sampling(
        7.5, seeds, sample.steps, sample.scheduler, sample.timestep_spacing, guidance_rescale=sample.guidance_rescale
    )
    ours = generate.generate(checkpoint, PROMPTS, sampling)  # as `pipeline sample`: the manifest's empty caption

    pipe = StableDiffusionPipeline.from_pretrained(folder)  # the first line a diffusers user types
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == config.train.prediction_type
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.safety_checker is None
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=[prompt for prompt in PROMPTS for _ in seeds],
        generator=[torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS for seed in seeds],
        height=resolution,
        width=resolution,
        num_inference_steps=sample.steps,
        guidance_scale=7.5,
        guidance_rescale=sample.guidance_rescale,
        output_type="np",
    ).images
    theirs = (theirs * 255).round().astype(np.uint8).reshape(ours.shape)
    assert ours.shape == (2, 2, resolution, resolution, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # rounding at .5 apart
    assert not np.array_equal(ours[0, 0], ours[0, 1])  # the seeds matter, so the check has teeth


def test_the_encoders_are_saved_once_and_shared_and_the_card_says_what_was_trained(tmp_path, model_dirs):
    config = sample_config(model_dirs, scheduler="dpmsolver++")
    run = RunDir(tmp_path / "run")  # an export validated beside training before these are written
    validation = {"step": STEPS[0], "metrics": {"prompt_accuracy": {"0": 0.125, "7.5": 0.875}, "fid": {"0": None}}}
    run.write_json(layout.SAMPLE_VALIDATION, {"checkpoints": [validation], "best": None})
    run = exported_run(tmp_path, config, tiny_unet())
    first, last = (run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}") for step in STEPS)
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        shared = os.stat(f"{run.path(layout.TRAIN_COMPONENTS)}/{name}")
        assert os.stat(f"{first}/{name}").st_ino == os.stat(f"{last}/{name}").st_ino == shared.st_ino, name
    index = json.loads(Path(last, layout.EXPORT_MODEL_INDEX).read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == [
        "diffusers",
        "DPMSolverMultistepScheduler",
    ]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    card = Path(last, layout.EXPORT_MODEL_CARD).read_text()
    assert f"step {STEPS[-1]:,}" in card and "StableDiffusionPipeline.from_pretrained" in card
    assert "| images encoded | 1,200 in 5 shards |" in card
    assert str(model_dirs["vae"]) in card and "[train]" in card  # the encoders and the run's config
    assert "| step | metric | guidance 0 | guidance 7.5 |" in card and "| 4 | prompt accuracy | 0.125 | 0.875 |" in card


def test_a_class_conditional_export_keeps_the_unet_the_sampler_and_its_classes_only(tmp_path, model_dirs):
    config = sample_config(model_dirs, scheduler="ddim")
    config = config.model_copy(update={"train": config.train.model_copy(update={"conditioning": "class"})})
    run = RunDir(tmp_path / "run")
    export_model(SimpleNamespace(module=tiny_unet()), run, config.train, 4, classes={"classes": ["a"]}, pipeline=config)
    folder = f"{layout.TRAIN_EXPORT}/{layout.step_name(4)}"
    assert sorted(run.list(folder)) == sorted([layout.COMMIT_MARKER, layout.EXPORT_CLASSES, "scheduler", "unet"])
    assert json.loads(run.read_text(f"{folder}/scheduler/scheduler_config.json"))["_class_name"] == "DDIMScheduler"
    assert not run.exists(layout.TRAIN_COMPONENTS)
