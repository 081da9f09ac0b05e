"""DeepSpeed config and the lr schedule across resumes (train.engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.core.config import load_config
from train.engine import deepspeed_config, restart_schedule
from train.step import learning_rate_factor


def train_config(*overrides: str):
    return load_config("tiny", overrides=list(overrides)).train


def test_deepspeed_config_follows_the_train_config():
    config = deepspeed_config(train_config("train.zero_stage=3", 'train.precision="bf16"', "train.gradient_accumulation=4"))
    assert config["zero_optimization"] == {"stage": 3}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_accumulation_steps"] == 4 and config["train_micro_batch_size_per_gpu"] == 32


def test_zero3_keeps_whole_only_parameters_below_ten_hidden_sizes_unless_told_otherwise():
    assert deepspeed_config(train_config("train.zero_stage=3"), hidden_size=1280)["zero_optimization"] == {
        "stage": 3,
        "stage3_param_persistence_threshold": 12800,
    }
    assert deepspeed_config(train_config("train.zero_stage=2"), hidden_size=1280)["zero_optimization"] == {"stage": 2}
    told = train_config("train.zero_stage=3", "train.deepspeed.zero_optimization.stage3_param_persistence_threshold=100000")
    assert deepspeed_config(told, hidden_size=1280)["zero_optimization"]["stage3_param_persistence_threshold"] == 100000


def test_train_deepspeed_is_merged_table_by_table_over_the_generated_config():
    config = deepspeed_config(
        train_config(
            "train.zero_stage=2",
            "train.deepspeed.zero_optimization.overlap_comm=true",
            "train.deepspeed.zero_optimization.reduce_bucket_size=50000000",
            "train.deepspeed.steps_per_print=100",
            "train.deepspeed.fp16.initial_scale_power=12",
        )
    )
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 50000000}
    assert config["steps_per_print"] == 100
    assert config["fp16"] == {"enabled": False, "initial_scale_power": 12}
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["gradient_clipping"] == 1.0  # untouched
    assert deepspeed_config(train_config()) == deepspeed_config(train_config("train.deepspeed={}"))


def test_extending_a_finished_cosine_run_takes_the_new_schedule():
    old = train_config("train.max_steps=4", "train.warmup_steps=0", "train.lr=1e-3")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=old.lr)
    schedule = LambdaLR(optimizer, lambda step: learning_rate_factor(step, 0, old.max_steps, "cosine"))
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # where the old run ended

    # the resumed run builds its scheduler from the new config, then loads the old state into it
    new = train_config("train.max_steps=8", "train.warmup_steps=0", "train.lr=2e-3")
    saved = schedule.state_dict()
    schedule = LambdaLR(optimizer, lambda step: learning_rate_factor(step, 0, new.max_steps, "cosine"))
    schedule.load_state_dict(saved)
    restart_schedule(SimpleNamespace(lr_scheduler=schedule), new)
    expected = 2e-3 * learning_rate_factor(4, 0, 8, "cosine")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected) and expected > 0
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * learning_rate_factor(5, 0, 8, "cosine"))
