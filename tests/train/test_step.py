"""The pure training step: caption dropout, the diffusion loss (min-SNR weighting, offset noise),
the NaN guard and the divergence stop, the schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import PRESETS, ConfigError, PipelineConfig, load_config
from train import distributed
from train.checkpoint import TrainState
from train.order import BatchPosition
from train.step import (
    PlainEngine,
    drop_captions,
    learning_rate_factor,
    loss_options,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    train_step,
)
from train.unet import build_unet

TEXT_SHAPE = (77, 64)


def make_batch(size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn((size, 4, 8, 8), generator=generator),
        "text_embeddings": torch.randn((size, *TEXT_SHAPE), generator=generator),
    }


def make_engine(lr: float = 1e-3) -> PlainEngine:
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=TEXT_SHAPE[1], sample_size=8)
    return PlainEngine(unet, torch.optim.AdamW(unet.parameters(), lr=lr), grad_clip=1.0)


def scheduler(prediction_type: str = "epsilon"):
    # Epsilon with the cosine schedule is refused under trailing spacing (sampling's business, not this test's).
    config = load_config(
        "tiny", overrides=[f'train.prediction_type="{prediction_type}"', 'sample.timestep_spacing="leading"']
    ).train
    return make_noise_scheduler(config)


@pytest.mark.parametrize("probability", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_replaces_about_p_of_the_captions(probability):
    text = torch.ones((20000, 2, 3))
    empty = torch.zeros((2, 3))
    out = drop_captions(text, empty, probability, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    kept = (out == 1).all(dim=(1, 2))
    assert bool((dropped | kept).all())  # whole embeddings swapped, never mixed
    assert dropped.float().mean().item() == pytest.approx(probability, abs=0.01)


def test_loss_decreases_on_a_fixed_batch():
    engine, noise_scheduler, batch = make_engine(), scheduler(), make_batch()
    empty = torch.zeros(TEXT_SHAPE)

    def step():  # the same dropout, timesteps and noise every time: only the weights change
        return train_step(engine, batch, noise_scheduler, empty, 0.1, torch.Generator().manual_seed(1))["loss"]

    first = step()
    for _ in range(9):
        last = step()
    assert last < 0.6 * first
    assert engine.global_steps == 10


def test_v_prediction_trains_against_the_velocity():
    engine = make_engine()
    result = train_step(engine, make_batch(), scheduler("v_prediction"), torch.zeros(TEXT_SHAPE), 0.0, torch.Generator())
    assert math.isfinite(result["loss"]) and not result["skipped"]


def test_non_finite_loss_skips_the_step():
    engine = make_engine()
    before = [parameter.detach().clone() for parameter in engine.module.parameters()]
    batch = make_batch()
    batch["latents"][0, 0, 0, 0] = float("nan")
    result = train_step(engine, batch, scheduler(), torch.zeros(TEXT_SHAPE), 0.1, torch.Generator())
    assert result["skipped"] and engine.global_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


def test_learning_rate_warms_up_then_follows_the_schedule():
    factors = [learning_rate_factor(step, 4, 12, "cosine") for step in range(13)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:])) and factors[12] == pytest.approx(0.0)
    assert learning_rate_factor(100, 4, 12, "constant") == 1.0
    assert learning_rate_factor(0, 0, 12, "cosine") == 1.0


def test_noise_scheduler_matches_the_config():
    config = scheduler("v_prediction").config
    assert config.prediction_type == "v_prediction" and config.clip_sample is False
    assert config.beta_schedule == "squaredcos_cap_v2" and config.num_train_timesteps == 1000


def reference_loss(engine, batch, noise_scheduler, generator, min_snr_gamma=None, noise_offset=0.0) -> float:
    """The step's loss written out by hand, without touching the weights: the draws in the step's
    order (dropout, noise, offset only when set, timesteps), then the MSE or its min-SNR weighting."""
    latents, text = batch["latents"], batch["text_embeddings"]
    text = drop_captions(text, torch.zeros(TEXT_SHAPE), 0.1, generator)
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
    with torch.no_grad():
        prediction = engine(noisy, timesteps, encoder_hidden_states=text).sample
    if min_snr_gamma is None:
        return F.mse_loss(prediction, target).item()
    alphas = noise_scheduler.alphas_cumprod.double()[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / (snr if epsilon else snr + 1)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double()
    return (weights * per_sample).mean().item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    alphas_cumprod = scheduler(prediction_type).alphas_cumprod
    timesteps = torch.arange(0, 1000, 7)
    weights = min_snr_weights(alphas_cumprod, timesteps, 5.0, prediction_type)

    snr = [a / (1 - a) for a in alphas_cumprod.double()[timesteps].tolist()]
    expected = [min(s, 5.0) / (s if prediction_type == "epsilon" else s + 1) for s in snr]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    if prediction_type == "epsilon":  # weight 1 where SNR <= gamma (noisy timesteps), gamma / SNR below 1 elsewhere
        assert weights[-1].item() == pytest.approx(1.0) and weights[0].item() < 1e-3
    else:
        assert all(0 < weight < 1 for weight in weights.tolist())


def test_min_snr_weights_stay_finite_at_zero_snr():
    alphas_cumprod = torch.tensor([0.9, 0.0])  # a zero-terminal-SNR schedule ends at alphas_cumprod 0
    epsilon = min_snr_weights(alphas_cumprod, torch.tensor([0, 1]), 5.0, "epsilon")
    assert epsilon.tolist() == pytest.approx([5.0 / 9.0, 1.0])
    assert min_snr_weights(alphas_cumprod, torch.tensor([1]), 5.0, "v_prediction").tolist() == [0.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_is_the_plain_mse_unless_min_snr_gamma_is_set(prediction_type):
    noise_scheduler, batch = scheduler(prediction_type), make_batch()
    plain_engine, weighted_engine = make_engine(), make_engine()

    plain = reference_loss(plain_engine, batch, noise_scheduler, torch.Generator().manual_seed(3))
    result = train_step(plain_engine, batch, noise_scheduler, torch.zeros(TEXT_SHAPE), 0.1, torch.Generator().manual_seed(3))
    assert result["loss"] == plain  # no option set: exactly the step as it was before the options

    weighted = reference_loss(weighted_engine, batch, noise_scheduler, torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    result = train_step(
        weighted_engine, batch, noise_scheduler, torch.zeros(TEXT_SHAPE), 0.1, torch.Generator().manual_seed(3), min_snr_gamma=5.0
    )
    assert result["loss"] == pytest.approx(weighted, rel=1e-5)
    assert weighted != pytest.approx(plain, rel=1e-3)


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    shape = (512, 4, 8, 8)
    plain_generator, offset_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = sample_noise(shape, 0.0, plain_generator)
    offset = sample_noise(shape, 0.5, offset_generator)

    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand(shape), atol=1e-6)  # constant over each (sample, channel)
    per_channel_shift = offset.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))
    assert per_channel_shift.std().item() == pytest.approx(0.5, rel=0.05)  # 0.5 x one N(0, 1) per (sample, channel)
    assert per_channel_shift.mean().abs().item() < 0.05
    # offset 0 draws nothing more, so the step's later draws (timesteps) are those of a run without the option
    reference = torch.Generator().manual_seed(0)
    assert torch.equal(plain, torch.randn(shape, generator=reference))
    assert torch.equal(plain_generator.get_state(), reference.get_state())


def test_loss_options_come_from_the_train_config():
    train = load_config("tiny", overrides=["train.min_snr_gamma=5.0", "train.noise_offset=0.05"]).train
    assert loss_options(train) == {"min_snr_gamma": 5.0, "noise_offset": 0.05}


def test_noise_offset_reaches_the_loss():
    noise_scheduler, batch, engine = scheduler(), make_batch(), make_engine()
    expected = reference_loss(engine, batch, noise_scheduler, torch.Generator().manual_seed(3), noise_offset=0.1)
    assert expected != pytest.approx(reference_loss(engine, batch, noise_scheduler, torch.Generator().manual_seed(3)), rel=1e-4)
    generator = torch.Generator().manual_seed(3)
    result = train_step(engine, batch, noise_scheduler, torch.zeros(TEXT_SHAPE), 0.1, generator, noise_offset=0.1)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_a_streak_of_non_finite_losses_stops_training_and_leaves_the_weights_alone():
    engine = make_engine()
    with torch.no_grad():
        next(engine.module.parameters())[0] = float("nan")  # diverged weights: every loss is NaN
    before = [parameter.detach().clone() for parameter in engine.module.parameters()]
    state = TrainState(step=7)
    for index in range(3):
        result = train_step(engine, make_batch(seed=index), scheduler(), torch.zeros(TEXT_SHAPE), 0.1, torch.Generator())
        state.advance(
            BatchPosition(epoch=0, taken=index, next_taken=index + 1, samples=[]), result["skipped"], engine.global_steps + 7
        )
        stop = state.nonfinite_streak_error(max_streak=3)
        assert (stop is None) == (index < 2)
    assert stop == (
        "the loss was not finite for 3 micro-batches in a row after step 7 (train.max_nonfinite_streak = 3): "
        "training diverged; try a lower train.lr or fp32 precision"
    )
    assert state.skipped_nonfinite == 3 and engine.global_steps == 0
    for a, b in zip(before, engine.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_finite_parameters_check_sees_one_bad_weight():
    module = make_engine().module
    assert distributed.all_ranks_finite_parameters(module)
    with torch.no_grad():
        list(module.parameters())[-1].view(-1)[0] = float("inf")
    assert not distributed.all_ranks_finite_parameters(module)


# The schedule each preset's UNet follows. sd15: SD-1.5's scheduler_config.json
# (runwayml/stable-diffusion-v1-5/scheduler); tiny: its own, cosine with v-prediction.
REFERENCE_SCHEDULES = {
    "sd15": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"},
    "micro": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_the_schedule_of_the_model_it_follows(preset):
    from diffusers import DDPMScheduler

    config = load_config(preset).train
    reference = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **REFERENCE_SCHEDULES[config.unet])
    ours = make_noise_scheduler(config)
    assert ours.config.prediction_type == reference.config.prediction_type
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=0)


def test_epsilon_on_the_cosine_schedule_sampled_from_pure_noise_is_refused_naming_the_keys():
    with pytest.raises(ConfigError) as refused:
        load_config("tiny", overrides=['train.prediction_type="epsilon"'])
    for key in ("train.prediction_type", "train.noise_schedule", "sample.timestep_spacing"):
        assert key in str(refused.value)
    load_config("tiny", overrides=['train.prediction_type="epsilon"', 'sample.timestep_spacing="leading"'])
    load_config("tiny", overrides=['train.prediction_type="epsilon"', 'train.noise_schedule="scaled_linear"'])
    assert PipelineConfig().train.prediction_type == "v_prediction"  # a config file that omits the keys is well-posed


@pytest.mark.parametrize(
    "schedule", [[], ['train.noise_schedule="scaled_linear"', "train.beta_start=0.00085", "train.beta_end=0.012"]]
)
def test_zero_terminal_snr_reaches_pure_noise_and_travels_with_the_export(schedule, tmp_path):
    from diffusers import DDPMScheduler

    from sample.guidance import SCHEDULERS, make_scheduler

    plain = make_noise_scheduler(load_config("tiny", overrides=schedule).train)
    config = load_config("tiny", overrides=[*schedule, "train.rescale_betas_zero_snr=true"]).train
    rescaled = make_noise_scheduler(config)
    assert float(plain.alphas_cumprod[-1]) > 0 and float(rescaled.alphas_cumprod[-1]) < 1e-12  # no signal at t = 999
    rescaled.save_pretrained(tmp_path / "scheduler")  # what an export holds
    exported = DDPMScheduler.load_config(tmp_path / "scheduler")
    assert exported["rescale_betas_zero_snr"] is True
    for name in SCHEDULERS:  # every sampler built from the export inherits it
        assert make_scheduler(name, exported).config.rescale_betas_zero_snr is True, name
    loss = train_step(make_engine(), make_batch(), rescaled, torch.zeros(TEXT_SHAPE), 0.1, torch.Generator().manual_seed(1))
    assert math.isfinite(loss["loss"])


def test_zero_terminal_snr_needs_v_prediction_and_stays_out_of_fingerprints_when_off():
    from pipeline.runner import _fingerprinted

    with pytest.raises(ConfigError, match="rescale_betas_zero_snr needs prediction_type = 'v_prediction'"):
        load_config("tiny", overrides=["train.rescale_betas_zero_snr=true", 'train.prediction_type="epsilon"'])
    assert "rescale_betas_zero_snr" not in _fingerprinted(load_config("tiny"))["train"]  # runs made before it keep theirs
    assert _fingerprinted(load_config("tiny", overrides=["train.rescale_betas_zero_snr=true"]))["train"]["rescale_betas_zero_snr"]
