"""The pure training step: caption dropout, the diffusion loss, the NaN guard, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from train.step import PlainEngine, drop_captions, learning_rate_factor, make_noise_scheduler, train_step
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
    config = load_config("tiny", overrides=[f'train.prediction_type="{prediction_type}"']).train
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
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[12] == pytest.approx(0.0)
    assert learning_rate_factor(100, 4, 12, "constant") == 1.0
    assert learning_rate_factor(0, 0, 12, "cosine") == 1.0


def test_noise_scheduler_matches_the_config():
    config = scheduler("v_prediction").config
    assert config.prediction_type == "v_prediction" and config.clip_sample is False
    assert config.beta_schedule == "squaredcos_cap_v2" and config.num_train_timesteps == 1000
