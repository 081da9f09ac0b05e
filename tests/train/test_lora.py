"""LoRA on the UNet (train.lora): only the adapters train, and an export is what diffusers' own
`load_lora_weights` loads: on the export's base it draws what `pipeline sample` draws for the same seeds
and scheduler; with train.lora_fuse_export its unet/ alone does. The base is saved once per run and shared."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from sample_support import PROMPTS, encode_manifest, sample_config

from pipeline.core import layout
from pipeline.core import lora as lora_files
from pipeline.core.config import ConfigError, LoraSettings, PipelineConfig, load_config
from pipeline.core.rundir import RunDir
from sample import export, generate
from sample.guidance import Sampling
from train import finetune
from train.checkpoint import export_model
from train.lora import LoraTargetError, add_adapters
from train.unet import build_unet, parameter_count

STEPS = (4, 8)
SETTINGS = LoraSettings(rank=4, alpha=8)  # alpha != rank: a loader that scaled by 1 would draw something else


def test_lora_is_checked_up_front_and_set_like_any_table():
    config = load_config("tiny", overrides=['train.init_from="base"', "train.lora.rank=8"])
    assert config.train.lora.rank == 8 and config.train.lora.scale_alpha == 8.0  # alpha defaults to the rank
    assert config.train.lora.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' LoRA example
    assert load_config("tiny", overrides=['train.init_from="base"', "train.lora={}"]).train.lora.rank == 4
    refused = {
        "train.lora={}": "lora is set but init_from is not",
        'train.init_from="base"\ntrain.lora={}\ntrain.freeze=["down_blocks"]': "lora and freeze are both set",
        "train.lora_fuse_export=true": "lora_fuse_export is set but lora is not",
        'train.init_from="base"\ntrain.lora.rank=0': "train.lora.rank",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", overrides=overrides.split("\n"))


def test_only_the_adapters_train_and_a_mistyped_target_is_named():
    unet = build_unet("tiny", cross_attention_dim=64, sample_size=8)
    total = parameter_count(unet)
    counts = add_adapters(unet, SETTINGS)
    trainable = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {"to_k", "to_q", "to_v", "0"}
    assert counts["frozen"] == total and counts["trainable"] == sum(
        parameter.numel() for parameter in unet.parameters() if parameter.requires_grad
    )
    assert counts["trainable"] < 0.02 * total
    with pytest.raises(LoraTargetError, match=r"'to_qq' names no layer of the UNet; its linear layers end in .*to_q"):
        add_adapters(build_unet("tiny", 64, 8), LoraSettings(target_modules=["to_q", "to_qq"]))
    assert issubclass(LoraTargetError, finetune.InitModelError)  # the train stage's driver reports it as one line


def lora_config(fuse: bool) -> PipelineConfig:
    config = sample_config(None, scheduler="dpmsolver++", steps=4)
    train = config.train.model_copy(update={"init_from": "the-base", "lora": SETTINGS, "lora_fuse_export": fuse})
    return config.model_copy(update={"train": train})


def trained_adapter(seed: int = 0) -> torch.nn.Module:
    """The tiny preset's UNet (builtin encoders: 64 px) with adapters as training leaves them: B no longer zero."""
    torch.manual_seed(seed)
    unet = build_unet("tiny", cross_attention_dim=64, sample_size=8)
    add_adapters(unet, SETTINGS)
    for name, parameter in unet.named_parameters():
        if ".lora_B." in name:
            parameter.data.normal_(std=0.05)
    return unet


def lora_run(tmp_path, config: PipelineConfig, unet) -> RunDir:
    run = RunDir(tmp_path / "run")
    encode = config.encode
    run.write_json(layout.ENCODE_MANIFEST, encode_manifest(encode.vae, encode.text_encoder, encode.tokenizer))
    for step in STEPS:
        export_model(SimpleNamespace(module=unet), run, config.train, step, pipeline=config)
    return run


def draw(pipe: StableDiffusionPipeline, config: PipelineConfig, seeds: list[int]) -> np.ndarray:
    images = pipe(
        prompt=[prompt for prompt in PROMPTS for _ in seeds],
        generator=[torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS for seed in seeds],
        height=64,
        width=64,
        num_inference_steps=config.sample.steps,
        guidance_scale=7.5,
        guidance_rescale=config.sample.guidance_rescale,
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8).reshape(len(PROMPTS), len(seeds), 64, 64, 3)


@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fused"])
def test_load_lora_weights_draws_what_pipeline_sample_draws(tmp_path, fuse):
    config = lora_config(fuse)
    run = lora_run(tmp_path, config, trained_adapter())
    folder = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(STEPS[-1])}")
    seeds = [3, 11]
    checkpoint = export.load_checkpoint(run, config, STEPS[-1], str(tmp_path / "scratch"), torch.device("cpu"))
    sample = config.sample
    ours = generate.generate(
        checkpoint,
        PROMPTS,
        Sampling(7.5, seeds, sample.steps, sample.scheduler, sample.timestep_spacing, guidance_rescale=sample.guidance_rescale),
    )

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    as_loaded = draw(pipe, config, seeds)
    if not fuse:
        pipe.load_lora_weights(folder)  # diffusers' own loader, on the export's base unet/
    theirs = draw(pipe, config, seeds)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # rounding at .5 apart
    assert not np.array_equal(ours[0, 0], ours[0, 1])  # the seeds matter
    if not fuse:  # the adapter matters: the base alone draws something else
        assert np.abs(as_loaded.astype(int) - theirs.astype(int)).max() > 10

    saved = json.loads(Path(folder, lora_files.RECORD_FILE).read_text())
    assert saved["unet"] == ("fused" if fuse else "base") and saved["rank"] == 4 and saved["alpha"] == 8
    with safe_open(f"{folder}/{lora_files.ADAPTER_FILE}", "pt") as adapter:
        assert all(key.startswith("unet.") for key in adapter.keys())  # noqa: SIM118 (a safetensors file, not a dict)
        assert json.loads(adapter.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8  # where loaders read alpha
    card = Path(folder, layout.EXPORT_MODEL_CARD).read_text()
    assert ("pipe.load_lora_weights(" in card) != fuse and "LoRA rank 4, alpha 8" in card


def test_the_base_is_saved_once_per_run_and_shared_into_each_export(tmp_path):
    run = lora_run(tmp_path, lora_config(fuse=False), trained_adapter())
    first, last = (run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}") for step in STEPS)
    weights = "unet/diffusion_pytorch_model.safetensors"
    base = os.stat(f"{run.path(layout.TRAIN_LORA_BASE)}/{weights}")
    assert os.stat(f"{first}/{weights}").st_ino == os.stat(f"{last}/{weights}").st_ino == base.st_ino
    assert not Path(last, layout.EXPORT_UNET, layout.COMMIT_MARKER).exists()  # a marker only where it commits
    # The base is the UNet without its adapter, under diffusers' own names.
    unet = trained_adapter()
    unet.disable_adapters()
    probe = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64))
    base_unet = export.load_export(run, STEPS[0], str(tmp_path / "s"), torch.device("cpu"))[0]
    assert lora_files.read_record(first)["unet"] == "base"
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(f"{first}/unet")
    assert torch.equal(plain(*probe).sample, unet(*probe).sample)
    unet.enable_adapters()
    assert torch.allclose(base_unet(*probe).sample, unet(*probe).sample, atol=1e-5)  # the sampler's: adapter fused in
    # Starting a full fine-tune from it would silently leave the adapter out: refused.
    train = load_config("tiny", overrides=[f'train.init_from="{first}"']).train
    with pytest.raises(finetune.InitModelError, match="is a LoRA export: its unet/ is the base"):
        finetune.resolve(train)
