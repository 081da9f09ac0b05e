"""The denoising UNet: a diffusers `UNet2DConditionModel` in one of three named shapes.

`micro` is the offline demo's 1.1M-parameter UNet (the tiny preset's: two levels, cross-attention
in both); `tiny` is the same at twice the width (4.2M parameters, 3.7x the FLOPs), which the demo
trained before; `sd15` is Stable Diffusion 1.5's UNet shape (~860M parameters). All cross-attend to the
text encoder's last hidden state, whose width is `cross_attention_dim`. Class-conditional
training adds diffusers' class embedding (`num_class_embeds`: the classes plus the null class),
added to the timestep embedding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import UNet2DConditionModel

TINY: dict[str, Any] = dict(
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # One layer per block gives the 4.2M parameters the demo was first calibrated with
    # (STACK-NOTES); two would give 6.1M.
    layers_per_block=1,
    # diffusers reads `attention_head_dim` as the number of heads here (as SD-1.5 does).
    attention_head_dim=8,
    norm_num_groups=32,
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    # Half the width: a step costs 2.5x less on a CPU core, and the demo's prompts are learnt in as
    # many steps (docs/training.md, "The demo's schedule"). Heads of 8 channels, as in `tiny`'s first level.
    "micro": {**TINY, "block_out_channels": (32, 64), "attention_head_dim": 4},
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
}


def build_unet(
    preset: str, cross_attention_dim: int, sample_size: int, on_meta: bool = False, num_class_embeds: int | None = None
) -> UNet2DConditionModel:
    """A freshly initialised UNet for 4-channel latents of side `sample_size`.

    `on_meta` builds it on the meta device (shapes only, no memory), to count parameters of
    models too large to allocate. `num_class_embeds` adds a learned class embedding.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {', '.join(PRESETS)}")
    device = torch.device("meta") if on_meta else contextlib.nullcontext()
    with device:
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
            **PRESETS[preset],
        )


def class_embedding_count(conditioning: str, classes: list[str] | None) -> int | None:
    """num_class_embeds for a conditioning mode: every class plus the null class (index len(classes)); None without classes."""
    if "class" not in conditioning:
        return None
    if not classes:
        raise ValueError(f"train.conditioning = {conditioning!r} but the encode manifest lists no classes (encode.class_field)")
    return len(classes) + 1


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
