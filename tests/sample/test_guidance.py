"""Classifier-free guidance, per-image seeding and every scheduler, on stubs and a tiny UNet."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from pydantic import ValidationError
from sample_support import LATENT_SHAPE, TEXT_DIM, tiny_unet, tiny_vae, training_scheduler

from pipeline.core.config import SampleConfig
from sample.guidance import (
    SCHEDULERS,
    ConditionRows,
    Sampling,
    decode,
    make_scheduler,
    predict_with_guidance,
    rescale_guided,
    sample_images,
    sample_latents,
)


class StubUNet(torch.nn.Module):
    """Predicts 0.1 * x + mean(embedding): linear in the conditioning, so guidance is checkable.
    Records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.batch_sizes: list[int] = []

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, t, encoder_hidden_states):
        self.batch_sizes.append(len(x))
        shift = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.1 * x + shift)


def embeddings(value: float, batch: int = 2) -> torch.Tensor:
    return torch.full((batch, 77, TEXT_DIM), value)


def test_guidance_combines_uncond_and_cond():
    unet = StubUNet()
    x = torch.randn(2, *LATENT_SHAPE)
    t = torch.tensor(500)
    cond, uncond = embeddings(2.0), embeddings(-1.0)
    for scale in (0.0, 1.0, 3.0, 7.5):
        got = predict_with_guidance(unet, x, t, cond, uncond, scale)
        expected = 0.1 * x + (-1.0 + scale * (2.0 - -1.0))
        torch.testing.assert_close(got, expected)
    # s = 0 and s = 1 run only one half; other scales run both halves in one call.
    assert unet.batch_sizes == [2, 2, 4, 4]


@pytest.mark.parametrize("scheduler_name", ["ddim", "ddpm"])
def test_scale_zero_is_unconditional_and_one_is_conditional(scheduler_name):
    unet = StubUNet()
    scheduler = make_scheduler(scheduler_name, training_scheduler().config)
    cond, uncond, other = embeddings(0.5), embeddings(-0.25), embeddings(9.0)
    run = lambda c, u, s: sample_latents(unet, scheduler, ConditionRows(c, u), s, [3, 4], 4, LATENT_SHAPE)  # noqa: E731
    torch.testing.assert_close(run(cond, uncond, 0.0), run(other, uncond, 0.0))  # cond is ignored at s=0
    torch.testing.assert_close(run(cond, uncond, 0.0), run(uncond, other, 1.0))  # = conditioning on uncond
    torch.testing.assert_close(run(cond, uncond, 1.0), run(cond, other, 1.0))  # uncond is ignored at s=1
    torch.testing.assert_close(run(cond, cond, 7.5), run(cond, other, 1.0))  # equal halves: no guidance effect
    assert not torch.allclose(run(cond, uncond, 7.5), run(cond, uncond, 1.0))


class ScaleStub(StubUNet):
    """Predicts x * mean(embedding): the guided prediction's spread grows with the scale."""

    def forward(self, x, t, encoder_hidden_states):
        self.batch_sizes.append(len(x))
        return SimpleNamespace(sample=x * encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def test_guidance_rescale_pulls_the_guided_spread_back_to_the_conditional_one():
    unet = ScaleStub()
    x = torch.randn(2, *LATENT_SHAPE)
    t = torch.tensor(500)
    cond, uncond = embeddings(2.0), embeddings(-1.0)  # cond predicts 2x, uncond -x
    guided = -x + 7.5 * (2 * x - -x)  # 21.5x
    torch.testing.assert_close(predict_with_guidance(unet, x, t, cond, uncond, 7.5), guided)
    torch.testing.assert_close(predict_with_guidance(unet, x, t, cond, uncond, 7.5, guidance_rescale=1.0), 2 * x)
    mixed = predict_with_guidance(unet, x, t, cond, uncond, 7.5, guidance_rescale=0.7)
    torch.testing.assert_close(mixed, 0.7 * 2 * x + 0.3 * guided)
    # s = 0 and s = 1 compute one half only: nothing to rescale against, and nothing to rescale.
    torch.testing.assert_close(predict_with_guidance(unet, x, t, cond, uncond, 0.0, guidance_rescale=0.7), -x)
    torch.testing.assert_close(predict_with_guidance(unet, x, t, cond, uncond, 1.0, guidance_rescale=0.7), 2 * x)


def test_rescale_is_diffusers_rescale_noise_cfg_per_image():
    generator = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(3, *LATENT_SHAPE, generator=generator) * 5, torch.randn(3, *LATENT_SHAPE, generator=generator)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_guided(guided, cond, phi), rescale_noise_cfg(guided, cond, guidance_rescale=phi))
    # Per image: image 0 alone gives what it gives in the batch.
    torch.testing.assert_close(rescale_guided(guided[:1], cond[:1], 0.7), rescale_guided(guided, cond, 0.7)[:1])


def test_guidance_rescale_defaults_to_lin_et_al_and_must_lie_in_0_1():
    # Plain guidance at 7.5 made every deterministic sampler fall short of 1000-step DDPM (issue 21).
    sample = SampleConfig()
    assert sample.guidance_rescale == 0.7 and sample.scheduler == "dpmsolver++" and sample.steps == 20
    assert Sampling.from_config(sample, 7.5).guidance_rescale == 0.7
    assert Sampling.from_config(sample.model_copy(update={"guidance_rescale": 0.0}), 7.5).guidance_rescale == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValidationError, match="guidance_rescale"):
            SampleConfig(guidance_rescale=bad)
        with pytest.raises(ValueError, match="guidance_rescale"):
            Sampling(7.5, [0], 20, "ddim", guidance_rescale=bad)


def test_sample_latents_applies_the_rescale():
    unet = ScaleStub()
    scheduler = make_scheduler("ddim", training_scheduler().config)
    rows = ConditionRows(embeddings(2.0), embeddings(-1.0))
    run = lambda s, phi: sample_latents(unet, scheduler, rows, s, [3, 4], 3, LATENT_SHAPE, guidance_rescale=phi)  # noqa: E731
    assert not torch.allclose(run(7.5, 0.7), run(7.5, 0.0))
    # phi = 1 on this stub: the conditional prediction (up to float round-off of the std ratio)
    torch.testing.assert_close(run(7.5, 1.0), run(1.0, 0.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(1.0, 0.7), run(1.0, 0.0))


def test_uncond_embedding_may_be_one_for_all():
    unet = StubUNet()
    scheduler = make_scheduler("ddim", training_scheduler().config)
    single = torch.full((77, TEXT_DIM), -0.5)
    torch.testing.assert_close(
        sample_latents(unet, scheduler, ConditionRows(embeddings(1.0), single), 3.0, [0, 1], 3, LATENT_SHAPE),
        sample_latents(unet, scheduler, ConditionRows(embeddings(1.0), embeddings(-0.5)), 3.0, [0, 1], 3, LATENT_SHAPE),
    )


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("scheduler_name", ["ddpm", "euler"])  # both draw noise at every step
def test_an_image_does_not_depend_on_its_batch(unet, scheduler_name):
    scheduler = make_scheduler(scheduler_name, training_scheduler().config)
    prompts = torch.randn(3, 77, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    alone = sample_latents(unet, scheduler, ConditionRows(prompts[1:2], prompts[0] * 0), 3.0, [5], 4, LATENT_SHAPE)
    batch = sample_latents(unet, scheduler, ConditionRows(prompts, prompts[0] * 0), 3.0, [1, 5, 7], 4, LATENT_SHAPE)
    # Equal up to float round-off of a different batch size (Euler's latents are large: scale it).
    scale = alone.abs().max().item()
    torch.testing.assert_close(batch[1:2], alone, atol=1e-3 * scale, rtol=1e-3)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_builds_from_the_training_schedule_and_runs(unet, name, prediction_type):
    training = training_scheduler(prediction_type)
    scheduler = make_scheduler(name, training.config)
    assert type(scheduler) is SCHEDULERS[name][0]
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.num_train_timesteps == 1000
    for key, value in SCHEDULERS[name][1].items():
        assert scheduler.config[key] == value
    rows = ConditionRows(torch.randn(2, 77, TEXT_DIM), torch.zeros(77, TEXT_DIM))
    latents = sample_latents(unet, scheduler, rows, 3.0, [0, 1], 3, LATENT_SHAPE)
    assert latents.shape == (2, *LATENT_SHAPE)
    assert torch.isfinite(latents).all()
    # Running again gives the same latents: set_timesteps resets multistep state.
    torch.testing.assert_close(sample_latents(unet, scheduler, rows, 3.0, [0, 1], 3, LATENT_SHAPE), latents)


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler 'plms'"):
        make_scheduler("plms", training_scheduler().config)


def test_decode_and_sample_images_give_uint8_grids(unet):
    vae = tiny_vae().eval()
    latents = torch.randn(3, *LATENT_SHAPE)
    images = decode(vae, latents, 0.5)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    config = training_scheduler().config
    rows = ConditionRows(torch.randn(3, 77, TEXT_DIM), torch.zeros(77, TEXT_DIM))
    sampling = Sampling(guidance_scale=3.0, seeds=(0, 1), steps=2, scheduler="dpmsolver++", batch_size=4)
    grid = sample_images(unet, vae, config, rows, sampling, LATENT_SHAPE, 0.5)
    assert grid.shape == (3, 2, 16, 16, 3) and grid.dtype == np.uint8
    # Chunking into batches of 4 (over 6 images) matches one batch of 6.
    whole = sample_images(unet, vae, config, rows, replace(sampling, batch_size=6), LATENT_SHAPE, 0.5)
    assert np.abs(grid.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_trailing_spacing_starts_from_pure_noise(name):
    scheduler = make_scheduler(name, training_scheduler().config)
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == training_scheduler().config.num_train_timesteps - 1
    leading = make_scheduler(name, training_scheduler().config, timestep_spacing="leading")
    leading.set_timesteps(20)
    assert int(leading.timesteps[0]) < int(scheduler.timesteps[0])
