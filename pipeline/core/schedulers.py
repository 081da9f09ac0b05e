"""The sampling schedulers by name, each built from a training schedule's config.

Shared by sampling (sample.guidance) and by the train stage's exports, whose `scheduler/` is the
sampler the run validates with, so that diffusers' StableDiffusionPipeline loads that one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
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


def make_scheduler(name: str, training_scheduler_config: Mapping[str, Any], timestep_spacing: str = "trailing") -> SchedulerMixin:
    """A sampling scheduler built from the exported training scheduler's config, so the beta
    schedule, number of training timesteps and prediction_type are the ones the UNet learned.

    "trailing" spacing starts at the last training timestep, pure noise under the cosine schedule
    or with `rescale_betas_zero_snr` (which the exported config carries), not under SD's betas;
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
