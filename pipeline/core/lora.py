"""LoRA adapter files (`train.lora`): saved where `StableDiffusionPipeline.load_lora_weights` reads them,
and fused into a plain UNet to sample.

A LoRA export holds the adapter (`pytorch_lora_weights.safetensors`: the moving average's when there is
one, the raw one then in `lora_online/`), `unet/` (the base UNet, or with `train.lora_fuse_export` the base
with the adapter fused in), and `lora.json` saying which: the sampler applies the adapter only to a base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import LoraSettings

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
RECORD_FILE = "lora.json"
ONLINE_DIR = "lora_online"
PREFIX = "unet"  # the key prefix load_lora_weights gives the UNet's adapter in a pipeline's file


def peft_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.scale_alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",  # A Gaussian, B zero: the adapted UNet starts as the base
        target_modules=list(settings.target_modules),
    )


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """`folder/pytorch_lora_weights.safetensors`, as `StableDiffusionPipeline.save_lora_weights` writes it; its
    metadata carries the LoRA config, so a loader scales by this alpha, not by the rank."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=peft_config(settings).to_dict(), safe_serialization=True
    )


def plain_unet(config: dict[str, Any], state: dict[str, torch.Tensor]):
    """A UNet2DConditionModel of `config` holding `state` (every weight, or it raises)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(state, strict=True)
    return unet


def fuse(unet: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`unet` (a plain base) with the adapter saved in `folder` loaded, as load_lora_weights loads it, and fused in."""
    unet.load_lora_adapter(str(folder), prefix=PREFIX, weight_name=ADAPTER_FILE)
    unet.fuse_lora()
    unet.unload_lora()  # the fused weights stay; the adapter layers go
    return unet


def record(settings: LoraSettings, base: str | None, fused: bool, trainable: int) -> dict[str, Any]:
    """lora.json: the adapter's settings, its base, and whether unet/ holds the base or the base fused."""
    return {
        "rank": settings.rank,
        "alpha": settings.scale_alpha,
        "dropout": settings.dropout,
        "target_modules": list(settings.target_modules),
        "base": base,
        "unet": "fused" if fused else "base",
        "trainable_parameters": trainable,
    }


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder, RECORD_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def apply_if_adapter(unet: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """An export's UNet as it samples: its base with the adapter fused in where `unet/` holds the base alone."""
    saved = read_record(folder)
    if saved is None or saved["unet"] == "fused":
        return unet
    return fuse(unet, folder)
