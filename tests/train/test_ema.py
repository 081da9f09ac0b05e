"""The moving average of the weights (train.ema): its math, warmup, checkpoint round trip, the
ZeRO-3 bookkeeping on one process, and exports (the 2-worker runs are in test_stage.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.core import layout
from pipeline.core.config import ConfigError, load_config
from pipeline.core.rundir import RunDir
from train.checkpoint import export_model
from train.ema import ExponentialMovingAverage, warmed_up_decay, weights_replaced
from train.unet import build_unet


def test_the_decay_warms_up_then_stays_at_its_cap():
    assert [warmed_up_decay(0.999, n) for n in range(3)] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert warmed_up_decay(0.999, 8990) == 0.999  # (1 + n) / (10 + n) passes 0.999 at n = 8990
    assert warmed_up_decay(0.999, 100) == pytest.approx(101 / 110)


def linear(weight: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(weight)
    return layer


def test_each_update_moves_the_average_toward_the_weights_by_one_minus_the_decay():
    layer = linear(0.0)
    ema = ExponentialMovingAverage(layer, decay=0.5)
    expected = 0.0
    for n, weight in enumerate([1.0, 2.0, 4.0, 4.0]):
        with torch.no_grad():
            layer.weight.fill_(weight)
            layer.bias.fill_(weight)
        ema.update()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * weight
        for average in ema.averages:
            torch.testing.assert_close(average, torch.full_like(average, expected))
    assert ema.updates == 4 and expected != 4.0  # it lags the weights
    assert torch.equal(layer.weight, torch.full((3, 2), 4.0))  # the weights themselves are untouched


def test_the_average_round_trips_through_a_checkpoint_folder(tmp_path):
    layer = linear(1.0)
    ema = ExponentialMovingAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.mul_(3)
    ema.update()
    ema.update()
    ema.save(tmp_path)

    restored = ExponentialMovingAverage(linear(7.0), decay=0.9)
    assert not restored.load(tmp_path / "elsewhere")  # no EMA there: nothing changes
    assert restored.load(tmp_path)
    assert restored.updates == 2
    for a, b in zip(restored.averages, ema.averages):
        assert torch.equal(a, b)

    with pytest.raises(RuntimeError, match="does not fit"):
        ExponentialMovingAverage(torch.nn.Linear(2, 4), decay=0.9).load(tmp_path)


def test_weights_replaced_puts_the_average_in_then_the_weights_back():
    layer = linear(2.0)
    ema = ExponentialMovingAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(5.0)
    with weights_replaced(layer, ema.full_weights()):
        assert torch.equal(layer.weight, torch.full((3, 2), 2.0))
    assert torch.equal(layer.weight, torch.full((3, 2), 5.0))


def test_under_zero_3_the_average_is_kept_on_the_partition_and_gathered_whole():
    """ZeRO-3's bookkeeping, faked on one rank: `ds_tensor` is this rank's flat, padded partition."""
    layer = torch.nn.Linear(2, 3, bias=False)
    parameter = layer.weight
    parameter.ds_numel, parameter.ds_shape = 6, (3, 2)
    parameter.ds_tensor = torch.cat([torch.arange(6.0), torch.zeros(2)])  # padded to 8
    ema = ExponentialMovingAverage(layer, decay=0.5)
    assert ema.partitioned and ema.averages[0].shape == (8,)

    parameter.ds_tensor.add_(10.0)
    ema.update()  # decay 0.1 at the first update
    whole = ema.full_weights()[0]
    torch.testing.assert_close(whole, (torch.arange(6.0) + 9.0).view(3, 2))


def as_rank(monkeypatch, rank: int, world: int) -> None:
    from train import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_an_average_saved_by_two_ranks_loads_whole_on_one(tmp_path, monkeypatch):
    """ZeRO 0-2: each of 2 ranks saves half of each flattened average; 1 rank joins them (elastic resume)."""
    layer = torch.nn.Linear(3, 3)  # 9 + 3 elements: odd halves are padded
    with torch.no_grad():
        layer.weight.copy_(torch.arange(9.0).view(3, 3))
        layer.bias.copy_(torch.tensor([-1.0, -2.0, -3.0]))
    ema = ExponentialMovingAverage(layer, decay=0.9)
    ema.updates = 5
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        ema.save(tmp_path)
    as_rank(monkeypatch, 0, 1)
    restored = ExponentialMovingAverage(torch.nn.Linear(3, 3), decay=0.9)
    assert restored.load(tmp_path, saved_world=2) and restored.updates == 5
    for a, b in zip(restored.averages, ema.averages):
        assert torch.equal(a, b)


def test_a_zero_3_average_is_resharded_for_another_world_size(tmp_path, monkeypatch):
    """ZeRO-3 partitions of 2 ranks (3 + 3 of 5 elements, the last padded) become 3 ranks' partitions of 2."""
    whole = torch.arange(1.0, 6.0)

    def partitioned(rank: int, world: int) -> torch.nn.Linear:
        layer = torch.nn.Linear(5, 1, bias=False)
        size = -(-5 // world)
        part = whole[rank * size : (rank + 1) * size]
        layer.weight.ds_numel, layer.weight.ds_shape = 5, (1, 5)
        layer.weight.ds_tensor = torch.cat([part, part.new_zeros(size - part.numel())])
        return layer

    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        ExponentialMovingAverage(partitioned(rank, 2), decay=0.9).save(tmp_path)
    for rank, expected in enumerate([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]):
        as_rank(monkeypatch, rank, 3)
        ema = ExponentialMovingAverage(partitioned(rank, 3), decay=0.9)
        ema.averages = [torch.full_like(ema.averages[0], -1.0)]
        assert ema.load(tmp_path, saved_world=2)
        assert ema.averages[0].tolist() == expected


def test_the_tiny_preset_keeps_an_average_and_zero_turns_it_off():
    engine = SimpleNamespace(module=linear(1.0), optimizer=None)
    assert load_config("tiny").train.ema_decay == 0.999
    assert ExponentialMovingAverage.of(engine, load_config("tiny").train).decay == 0.999
    assert ExponentialMovingAverage.of(engine, load_config("tiny", overrides=["train.ema_decay=0"]).train) is None
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config("tiny", overrides=["train.ema_decay=1.0"])


@pytest.mark.parametrize("with_average", [True, False])
def test_an_export_holds_the_average_in_unet_and_the_weights_in_unet_online(tmp_path, with_average):
    config = load_config("tiny").train
    unet = build_unet(config.unet, cross_attention_dim=32, sample_size=8)
    ema = ExponentialMovingAverage(unet, decay=0.999) if with_average else None
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1.0)
    if ema is not None:
        ema.update()  # decay 0.1: the average is the initial weights + 0.9
    run = RunDir(tmp_path / "run")
    export_model(SimpleNamespace(module=unet), run, config, step=3, ema=ema)

    export = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(3)}")
    exported = UNet2DConditionModel.from_pretrained(f"{export}/{layout.EXPORT_UNET}").state_dict()
    weights = unet.state_dict()
    if ema is None:
        assert not run.exists(f"{layout.TRAIN_EXPORT}/{layout.step_name(3)}/{layout.EXPORT_UNET_ONLINE}")
        for name, value in exported.items():
            assert torch.equal(value, weights[name])
        return
    online = UNet2DConditionModel.from_pretrained(f"{export}/{layout.EXPORT_UNET_ONLINE}").state_dict()
    for name, value in online.items():
        assert torch.equal(value, weights[name])  # and the export left the module's weights as they were
        torch.testing.assert_close(exported[name], value - 0.1)
