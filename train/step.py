"""One training step of text- (or class-) conditional latent diffusion, free of Ray and process groups.

`train_step` takes an engine: a DeepSpeed engine in the Ray workers, or `PlainEngine` (a
module plus a torch optimizer behind the same four methods) in tests and notebooks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from pipeline.core.config import TrainConfig
from train import distributed


def make_noise_scheduler(config: TrainConfig) -> DDPMScheduler:
    """The DDPM forward process training uses; exported next to the UNet for sampling.

    `clip_sample=False` because latents are scaled, not bounded to [-1, 1]. Unset beta_start and
    beta_end keep diffusers' defaults. `rescale_betas_zero_snr` lands in the scheduler's config, so
    the export carries it and every sampler built from that config (sample.guidance) inherits it.
    """
    betas = {key: getattr(config, key) for key in ("beta_start", "beta_end") if getattr(config, key) is not None}
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.noise_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        **betas,
    )


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup to 1 over `warmup_steps` (the first step already moves), then constant or a
    half cosine to 0 at `max_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def drop_captions(
    text_embeddings: torch.Tensor, empty_caption_embedding: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Replace each sample's caption embedding by the empty caption's with `probability`.

    This is what lets one UNet give both the conditional and the unconditional prediction
    that classifier-free guidance combines at sampling time.
    """
    return drop_conditioning(text_embeddings, None, empty_caption_embedding, None, probability, generator)[0]


def drop_conditioning(
    text_embeddings: torch.Tensor,
    class_labels: torch.Tensor | None,
    empty_caption_embedding: torch.Tensor,
    null_class: int | None,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`drop_captions`, and with class labels the same draw replaces a dropped sample's label by
    `null_class`: the unconditional branch is (empty caption, null class), as guidance asks for it."""
    dropped = torch.rand(text_embeddings.shape[0], generator=generator) < probability
    empty = empty_caption_embedding.to(text_embeddings.dtype).expand_as(text_embeddings)
    text = torch.where(dropped[:, None, None], empty, text_embeddings)
    if class_labels is None:
        return text, None
    return text, torch.where(dropped, torch.full_like(class_labels, null_class), class_labels)


def sample_noise(shape: torch.Size, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise for the forward process, plus `noise_offset` times one Gaussian per (sample, channel).

    The offset (Guttenberg, "Diffusion with offset noise", 2023) lets the model change an image's
    mean brightness, which zero-mean noise almost never asks it to. With offset 0 nothing more is
    drawn from `generator`, so the step's later draws are those of a run without the option.
    """
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((*shape[:2], *(1,) * (len(shape) - 2)), generator=generator)
    return noise


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", 2023), as in diffusers' train_text_to_image.py.

    SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]). Epsilon-prediction weighs min(SNR, gamma) / SNR
    (written as min(gamma / SNR, 1), which stays finite at SNR 0); v-prediction, whose loss already
    carries a factor SNR + 1, weighs min(SNR, gamma) / (SNR + 1).
    """
    alphas = alphas_cumprod.to(torch.float64)[timesteps]
    snr = alphas / (1.0 - alphas)
    if prediction_type == "v_prediction":
        weights = snr.clamp(max=gamma) / (snr + 1.0)
    else:
        weights = (gamma / snr).clamp(max=1.0)
    return weights.float()


def loss_options(config: TrainConfig, class_count: int | None = None) -> dict:
    """`train_step`'s keyword options, from the train config (and the encode manifest's class count)."""
    options = {"min_snr_gamma": config.min_snr_gamma, "noise_offset": config.noise_offset}
    if "class" in config.conditioning:
        if class_count is None:
            raise ValueError(f"train.conditioning = {config.conditioning!r} but the latents carry no class labels")
        options.update(null_class=class_count, text_conditioned=config.conditioning == "text+class")
    return options


def train_step(
    engine,
    batch: dict[str, torch.Tensor],
    noise_scheduler: DDPMScheduler,
    empty_caption_embedding: torch.Tensor,
    caption_dropout: float,
    generator: torch.Generator,
    *,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    null_class: int | None = None,
    text_conditioned: bool = True,
    phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
) -> dict:
    """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch.

    All randomness (dropout, noise, timesteps) comes from `generator`, on the CPU, so a
    step is reproducible on any device. The loss is the MSE to the target, or with
    `min_snr_gamma` the mean of each sample's MSE times its `min_snr_weights`. A loss that
    is not finite on any rank skips the backward and the step on every rank (ranks must
    agree, or ZeRO's gradient collectives would wait forever); the caller counts `skipped`.

    With `null_class` (class conditioning) the UNet also gets the batch's `class_labels`, dropped to
    `null_class` with the captions; without `text_conditioned` every caption is the empty one.
    `phase(name)` times the parts (train.profile: "draws", "forward", "loss check").
    """
    device, dtype = engine.device, next(engine.module.parameters()).dtype
    with phase("draws"):
        # fp16 (or pinned) on the host; copied without blocking and cast on the device.
        latents = batch["latents"].to(device, non_blocking=True).float()
        text = batch["text_embeddings"]
        if not text_conditioned:
            text = empty_caption_embedding.to(text.dtype).expand_as(text)
        labels = batch["class_labels"] if null_class is not None else None
        text, labels = drop_conditioning(text, labels, empty_caption_embedding, null_class, caption_dropout, generator)
        extra = {} if labels is None else {"class_labels": labels.to(device)}
        noise = sample_noise(latents.shape, noise_offset, generator).to(device, non_blocking=True)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
    with phase("forward"):
        prediction = engine(
            noisy.to(dtype), timesteps, encoder_hidden_states=text.to(device, dtype, non_blocking=True), **extra
        ).sample
        if min_snr_gamma is None:
            loss = F.mse_loss(prediction.float(), target)
        else:
            per_sample = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
            weights = min_snr_weights(noise_scheduler.alphas_cumprod, timesteps.cpu(), min_snr_gamma, prediction_type)
            loss = (weights.to(device) * per_sample).mean()
    with phase("loss check"):
        finite = distributed.all_ranks_finite(loss)
    if not finite:
        return {"loss": float("nan"), "skipped": True}
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), "skipped": False}


class PlainEngine:
    """A module and a torch optimizer behind the slice of DeepSpeed's engine API `train_step` uses."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip
        self.device = next(module.parameters()).device
        self.global_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm
