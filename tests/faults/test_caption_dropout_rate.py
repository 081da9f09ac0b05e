"""Caption dropout really happens, at the configured rate, in the embeddings the UNet receives.

`train.step.drop_captions` alone is tested in tests/train/test_step.py; here the whole path the
training loop takes is: `train_step` with the config's `train.caption_dropout` and one
generator per batch from `distributed.batch_generator(seed, rank, epoch, index)`, as
`train.loop.train_worker` calls it. A stand-in model records `encoder_hidden_states`, so no
UNet runs. Over many batches the share of empty-caption embeddings must lie within 5 binomial
standard deviations of the probability, independently per batch position, and 0 gives none.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.config import load_config
from train import distributed
from train.step import PlainEngine, make_noise_scheduler, train_step

BATCH, BATCHES, TEXT_SHAPE = 16, 400, (77, 8)


class Recorder(torch.nn.Module):
    """Takes a UNet's place: records the caption embeddings it is given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, noisy, timesteps, encoder_hidden_states):
        self.seen.append(encoder_hidden_states.detach().clone())
        return SimpleNamespace(sample=noisy * self.scale)


def dropped_masks(probability: float) -> torch.Tensor:
    """[BATCHES, BATCH] booleans: which embeddings reached the model as the empty caption's."""
    config = load_config("tiny", overrides=[f"train.caption_dropout={probability}"])
    recorder = Recorder()
    engine = PlainEngine(recorder, torch.optim.SGD(recorder.parameters(), lr=0.0))
    empty = torch.full(TEXT_SHAPE, 7.0)  # no caption embedding equals it by chance
    noise_scheduler = make_noise_scheduler(config.train)
    for index in range(BATCHES):
        captions = torch.randn((BATCH, *TEXT_SHAPE), generator=torch.Generator().manual_seed(index))
        batch = {"latents": torch.zeros((BATCH, 4, 8, 8)), "text_embeddings": captions}
        generator = distributed.batch_generator(config.seed, 0, 0, index)
        train_step(engine, batch, noise_scheduler, empty, config.train.caption_dropout, generator)
    seen = torch.stack(recorder.seen)
    dropped = (seen == empty).all(dim=(2, 3))
    assert bool((dropped | (seen != empty).all(dim=(2, 3))).all())  # whole embeddings swapped, never mixed
    return dropped


def within_5_sigma(count: int, trials: int, probability: float) -> bool:
    return abs(count - trials * probability) <= 5 * math.sqrt(trials * probability * (1 - probability))


@pytest.mark.parametrize("probability", [0.1, 0.5])
def test_the_share_of_empty_captions_matches_the_configured_probability(probability):
    dropped = dropped_masks(probability)
    assert within_5_sigma(int(dropped.sum()), dropped.numel(), probability)
    for position in range(BATCH):  # every place in the batch, not a fixed subset
        assert within_5_sigma(int(dropped[:, position].sum()), BATCHES, probability)
    # A fresh draw per batch: at p = 0.1 about 190 of 400 masks differ (the empty mask is common).
    assert len({tuple(mask.tolist()) for mask in dropped}) > BATCHES // 4


def test_the_default_config_drops_about_a_tenth():
    assert load_config("tiny").train.caption_dropout == pytest.approx(0.1)


def test_zero_drops_none_and_one_drops_all():
    assert not dropped_masks(0.0).any()
    assert dropped_masks(1.0).all()
