"""Classifier-free-guided sampling with diffusers schedulers, and decoding latents to pixels.

The caller owns the denoising loop (diffusers' "simple over easy"): every scheduler has the
same `set_timesteps` / `scale_model_input` / `step` contract, so one loop serves them all.
Guidance follows Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022):

    prediction = uncond + s * (cond - uncond)

where `uncond` is the UNet's prediction given the empty-caption embedding (what caption
dropout trained it on) and `cond` its prediction given the prompt. A class-conditional UNet
also gets class labels: the image's class in `cond`, the null class (which dropout put in
place of the label, in the same draw as the empty caption) in `uncond`. s = 0 samples the
unconditional model, s = 1 the conditional one, s > 1 pushes further towards the prompt.

Every image draws its noise (initial and, for stochastic schedulers, per step) from its own
generator seeded with its own seed, so an image does not depend on what else is in its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (scheduler class, settings that override the training schedule's config).
# clip_sample=False: latents scaled to unit variance are not bounded by [-1, 1], so clipping
# the predicted x0 (DDPM's and DDIM's default) would damage them.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {"clip_sample": False}),
    "ddim": (DDIMScheduler, {"clip_sample": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_scheduler(
    name: str, training_scheduler_config: Mapping[str, Any], timestep_spacing: str = "trailing"
) -> SchedulerMixin:
    """A sampling scheduler built from the exported training scheduler's config, so the beta
    schedule, number of training timesteps and prediction_type are the ones the UNet learned.

    "trailing" spacing starts at the last training timestep, where the latent is pure noise;
    "leading" (diffusers' default) starts lower, near t=950 for 20 steps, where the model
    expects some signal and reads it from the noise, so the seed rather than the prompt picks
    low-frequency content such as a background colour (Lin et al., "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", 2023). At t=T an epsilon model's x0 estimate is
    ill-conditioned under schedules that reach zero signal; v-prediction is not.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(dict(training_scheduler_config), **overrides, timestep_spacing=timestep_spacing)


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """[B, *latent_shape] standard normal noise, image i drawn from a CPU generator seeded with
    seeds[i]; the generators are returned so that stochastic schedulers keep drawing from them."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators])
    return noise, generators


def predict_with_guidance(
    unet: torch.nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    guidance_scale: float,
    cond_labels: torch.Tensor | None = None,
    uncond_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`uncond + s * (cond - uncond)`, both halves in one batched UNet call; at s = 0 only the
    unconditional half is computed and at s = 1 only the conditional one (same result, half the work).
    The labels ([B] class indices) go with their half when the UNet is class-conditional."""

    def labels(*halves):
        return {} if cond_labels is None else {"class_labels": torch.cat(halves)}

    if guidance_scale == 0:
        return unet(model_input, timestep, encoder_hidden_states=uncond_embeddings, **labels(uncond_labels)).sample
    if guidance_scale == 1:
        return unet(model_input, timestep, encoder_hidden_states=cond_embeddings, **labels(cond_labels)).sample
    both = unet(
        torch.cat([model_input, model_input]),
        timestep,
        encoder_hidden_states=torch.cat([uncond_embeddings, cond_embeddings]),
        **labels(uncond_labels, cond_labels),
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.inference_mode()
def sample_latents(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    cond_embeddings: torch.Tensor,
    uncond_embedding: torch.Tensor,
    guidance_scale: float,
    seeds: Sequence[int],
    steps: int,
    latent_shape: Sequence[int],
    class_labels: Sequence[int] | None = None,
    null_class: int | None = None,
) -> torch.Tensor:
    """Denoise one batch: image i is conditioned on cond_embeddings[i] ([B, 77, D]) and seeded by
    seeds[i]; uncond_embedding is the empty caption's ([77, D], or [B, 77, D]). With `class_labels`
    image i is also conditioned on class class_labels[i], against `null_class` unconditionally.
    Returns latents [B, *latent_shape] in the UNet's scaled latent space (see `decode`)."""
    if len(seeds) != len(cond_embeddings):
        raise ValueError(f"{len(seeds)} seeds for {len(cond_embeddings)} prompt embeddings")
    if (class_labels is None) != (null_class is None) or (class_labels is not None and len(class_labels) != len(seeds)):
        raise ValueError("class_labels needs null_class and one label per seed")
    device, dtype = unet.device, unet.dtype
    cond = cond_embeddings.to(device, dtype)
    uncond = uncond_embedding.to(device, dtype)
    if uncond.ndim == 2:
        uncond = uncond.expand(len(cond), *uncond.shape)
    labels = {}
    if class_labels is not None:
        cond_labels = torch.as_tensor(list(class_labels), dtype=torch.long, device=device)
        labels = {"cond_labels": cond_labels, "uncond_labels": torch.full_like(cond_labels, null_class)}

    noise, generators = initial_noise(seeds, latent_shape)
    scheduler.set_timesteps(steps, device=device)  # also resets multistep solvers' history
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        prediction = predict_with_guidance(unet, model_input, timestep, cond, uncond, guidance_scale, **labels)
        latents = scheduler.step(prediction, timestep, latents, generator=generators).prev_sample
    return latents


@torch.inference_mode()
def decode(vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """Scaled latents [B, 4, h, w] -> uint8 images [B, H, W, 3] (undo the scaling, decode,
    map [-1, 1] to [0, 255])."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / scaling_factor).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def sample_images(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    scheduler: SchedulerMixin,
    prompt_embeddings: torch.Tensor,
    uncond_embedding: torch.Tensor,
    guidance_scale: float,
    seeds: Sequence[int],
    steps: int,
    latent_shape: Sequence[int],
    scaling_factor: float,
    batch_size: int,
    class_labels: Sequence[int] | None = None,
    null_class: int | None = None,
) -> np.ndarray:
    """One image per (prompt, seed), denoised `batch_size` images at a time (the UNet sees twice
    that when both guidance halves are needed); prompt p also has class class_labels[p] when given.
    Returns uint8 [P, S, H, W, 3]."""
    pairs = [(p, seed) for p in range(len(prompt_embeddings)) for seed in seeds]
    images = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        cond = prompt_embeddings[[p for p, _ in batch]]
        labels = None if class_labels is None else [class_labels[p] for p, _ in batch]
        latents = sample_latents(
            unet, scheduler, cond, uncond_embedding, guidance_scale, [s for _, s in batch], steps, latent_shape,
            labels, null_class,
        )  # fmt: skip
        images.append(decode(vae, latents, scaling_factor))
    flat = np.concatenate(images)
    return flat.reshape(len(prompt_embeddings), len(seeds), *flat.shape[1:])
