"""Loading a committed export for sampling: its UNet and training scheduler (`load_export`), and with
the run's encoders, refused unless their weights made the training latents (`pipeline.core.identity`),
everything `pipeline sample` and validation need (`load_checkpoint`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipeline.core import layout, lora, models
from pipeline.core.arrays import from_base64_npy
from pipeline.core.config import PipelineConfig
from pipeline.core.identity import check_run_encoders
from pipeline.core.rundir import RunDir


def load_export(run: RunDir, step: int, scratch: str, device: torch.device, with_classes: bool = False):
    """(UNet, training scheduler config) of a committed export, copied locally first if remote; a LoRA export's
    UNet is its base with the adapter fused in. `with_classes` adds its classes.json (None for a text-conditional export)."""
    folder = run.get_dir(f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}", Path(scratch) / layout.step_name(step))
    unet = UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=torch.float32, use_safetensors=True, **models.DIFFUSERS_LOAD_OPTIONS
    )
    unet = lora.apply_if_adapter(unet, folder)  # a LoRA export: its base with the adapter fused in
    unet.eval().requires_grad_(False)
    loaded = unet.to(device), DDPMScheduler.load_config(folder / "scheduler")
    if not with_classes:
        return loaded
    classes = folder / layout.EXPORT_CLASSES
    return (*loaded, json.loads(classes.read_text()) if classes.is_file() else None)


@dataclass
class Checkpoint:
    """An exported UNet with everything sampling it needs."""

    step: int
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: Any
    text_encoder: torch.nn.Module
    scheduler_config: dict[str, Any]
    empty_embedding: torch.Tensor  # [77, D], float32
    latent_shape: list[int]
    scaling_factor: float
    classes: dict[str, Any] | None = None  # the export's classes.json (class-conditional exports only)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        return models.encode_prompts(self.tokenizer, self.text_encoder, prompts).float().cpu()


def pick_step(run: RunDir, step: int | None) -> int:
    """`step` if it is a committed export, else the latest one when `step` is None."""
    exported = run.committed_steps(layout.TRAIN_EXPORT)
    if not exported:
        raise FileNotFoundError(f"no committed export under {run.path(layout.TRAIN_EXPORT)}: train first")
    if step is None:
        return exported[-1]
    if step not in exported:
        raise ValueError(f"checkpoint {step} is not a committed export; committed: {exported}")
    return step


def load_checkpoint(run: RunDir, config: PipelineConfig, step: int | None, scratch: str, device: torch.device) -> Checkpoint:
    step = pick_step(run, step)
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    encoders = check_run_encoders(config.encode, manifest, where=run.path(layout.ENCODE_MANIFEST))
    unet, scheduler_config, classes = load_export(run, step, scratch, device, with_classes=True)
    return Checkpoint(
        step=step,
        unet=unet,
        vae=encoders.vae.to(device),
        tokenizer=encoders.tokenizer,
        text_encoder=encoders.text_encoder.to(device),
        scheduler_config=dict(scheduler_config),
        empty_embedding=torch.from_numpy(from_base64_npy(manifest["empty_caption_embedding"])).float(),
        latent_shape=list(manifest["latent_shape"]),
        scaling_factor=float(manifest["vae"]["scaling_factor"]),
        classes=classes,
    )
