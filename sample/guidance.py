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
diffusers' StableDiffusionPipeline differs below 1: it skips guidance for any s <= 1 and samples
the conditional model, so the two agree from s = 1 up only.

At high scales the guided prediction overshoots: on the tiny demo at s = 7.5 its standard
deviation is 7x the conditional prediction's at t = 999 and 1.5x halfway down, and a
deterministic (ODE) sampler carries that excess into wrong colours however many
steps it takes (docs/sampling.md#guidance-rescale). `guidance_rescale` phi (Lin et al., "Common Diffusion
Noise Schedules and Sample Steps are Flawed", 2023, section 3.4; diffusers' `guidance_rescale`)
rescales the guided prediction to the conditional prediction's standard deviation, per image,
and mixes: phi * rescaled + (1 - phi) * guided. It applies only where both halves are computed
(s other than 0 and 1).

Every image draws its noise (initial and, for stochastic schedulers, per step) from its own
generator seeded with its own seed, so an image does not depend on what else is in its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.core.config import SampleConfig
from pipeline.core.schedulers import SCHEDULERS, make_scheduler  # noqa: F401 (shared with the train stage's exports)


@dataclass(frozen=True)
class Sampling:
    """The settings every image of one sampling call shares: what `pipeline sample` takes as options
    and the sample stage reads from `sample.*` (one guidance scale at a time)."""

    guidance_scale: float
    """Classifier-free guidance scale s: 0 samples the unconditional model, 1 the conditional one, > 1 pushes further."""
    seeds: tuple[int, ...]
    """One image per seed for every row (any sequence, kept as a tuple); an image's noise comes from a
    generator seeded with its seed."""
    steps: int
    """Denoising steps (the scheduler's `set_timesteps`)."""
    scheduler: str
    """A name in SCHEDULERS: ddpm, ddim, dpmsolver++ or euler."""
    timestep_spacing: str = "trailing"
    """How the steps are spread over the training timesteps (see `make_scheduler`)."""
    batch_size: int = 16
    """Images denoised together; the UNet sees twice that when both guidance halves are needed."""
    guidance_rescale: float = 0.0
    """phi in [0, 1]: mix of the guided prediction rescaled to the conditional one's standard deviation
    (see the module docstring); 0 is plain guidance."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale {self.guidance_rescale} is not in [0, 1]")

    @classmethod
    def from_config(cls, sample: SampleConfig, guidance_scale: float) -> Sampling:
        """The sample stage's settings (`sample.*`) at one of its guidance scales."""
        return cls(
            guidance_scale,
            sample.seeds,
            sample.steps,
            sample.scheduler,
            sample.timestep_spacing,
            sample.batch_size,
            sample.guidance_rescale,
        )


@dataclass(frozen=True, eq=False)
class ConditionRows:
    """What each row of images is conditioned on, embedded, and the unconditional half guidance
    pushes away from. Row p has its prompt's embedding (and with class labels, its class)."""

    embeddings: torch.Tensor
    """[rows, 77, D] text embeddings, one per row."""
    uncond_embedding: torch.Tensor
    """The unconditional half's: the empty caption's [77, D], shared by every row (`sample_latents`
    also takes one per row, [rows, 77, D]; `select` keeps it as it is)."""
    class_labels: Sequence[int] | None = None
    """Row p's class, for a class-conditional UNet; None for a text-only one."""
    null_class: int | None = None
    """The class dropout put in place of the label (the unconditional half's); set with class_labels."""

    def __post_init__(self) -> None:
        labels = self.class_labels
        if (labels is None) != (self.null_class is None) or (labels is not None and len(labels) != len(self.embeddings)):
            raise ValueError("class_labels needs null_class and one label per row")

    def select(self, rows: Sequence[int]) -> ConditionRows:
        """These rows (repeats allowed), against the same unconditional half."""
        labels = None if self.class_labels is None else [self.class_labels[row] for row in rows]
        return replace(self, embeddings=self.embeddings[list(rows)], class_labels=labels)


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
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """`uncond + s * (cond - uncond)`, both halves in one batched UNet call; at s = 0 only the
    unconditional half is computed and at s = 1 only the conditional one (same result, half the work).
    The labels ([B] class indices) go with their half when the UNet is class-conditional.
    With both halves, `guidance_rescale` > 0 then applies `rescale_guided`."""

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
    guided = uncond + guidance_scale * (cond - uncond)
    return rescale_guided(guided, cond, guidance_rescale) if guidance_rescale else guided


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, section 3.4 (diffusers' `rescale_noise_cfg`): `guided` scaled per image to
    `cond`'s standard deviation, mixed with `guided` itself by `phi`."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


@torch.inference_mode()
def sample_latents(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    rows: ConditionRows,
    guidance_scale: float,
    seeds: Sequence[int],
    steps: int,
    latent_shape: Sequence[int],
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Denoise one batch: image i is conditioned on row i of `rows` (its embedding [77, D], and its
    class against the null class when `rows` has class labels) and seeded by seeds[i].
    `guidance_rescale`: see `predict_with_guidance`.
    Returns latents [B, *latent_shape] in the UNet's scaled latent space (see `decode`)."""
    if len(seeds) != len(rows.embeddings):
        raise ValueError(f"{len(seeds)} seeds for {len(rows.embeddings)} prompt embeddings")
    device, dtype = unet.device, unet.dtype
    cond = rows.embeddings.to(device, dtype)
    uncond = rows.uncond_embedding.to(device, dtype)
    if uncond.ndim == 2:
        uncond = uncond.expand(len(cond), *uncond.shape)
    labels = {}
    if rows.class_labels is not None:
        cond_labels = torch.as_tensor(list(rows.class_labels), dtype=torch.long, device=device)
        labels = {"cond_labels": cond_labels, "uncond_labels": torch.full_like(cond_labels, rows.null_class)}

    noise, generators = initial_noise(seeds, latent_shape)
    scheduler.set_timesteps(steps, device=device)  # also resets multistep solvers' history
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        prediction = predict_with_guidance(
            unet, model_input, timestep, cond, uncond, guidance_scale, **labels, guidance_rescale=guidance_rescale
        )
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
    scheduler_config: Mapping[str, Any],
    rows: ConditionRows,
    sampling: Sampling,
    latent_shape: Sequence[int],
    scaling_factor: float,
) -> np.ndarray:
    """One image per (row, seed), denoised `sampling.batch_size` images at a time with the scheduler
    `sampling` names, built from the export's training `scheduler_config`. Returns uint8 [P, S, H, W, 3]."""
    scheduler = make_scheduler(sampling.scheduler, scheduler_config, sampling.timestep_spacing)
    pairs = [(row, seed) for row in range(len(rows.embeddings)) for seed in sampling.seeds]
    images = []
    for start in range(0, len(pairs), sampling.batch_size):
        batch = pairs[start : start + sampling.batch_size]
        batch_rows = rows.select([row for row, _ in batch])
        seeds = [seed for _, seed in batch]
        latents = sample_latents(
            unet,
            scheduler,
            batch_rows,
            sampling.guidance_scale,
            seeds,
            sampling.steps,
            latent_shape,
            sampling.guidance_rescale,
        )
        images.append(decode(vae, latents, scaling_factor))
    flat = np.concatenate(images)
    return flat.reshape(len(rows.embeddings), len(sampling.seeds), *flat.shape[1:])
