"""LoRA under DeepSpeed, on two real gloo ranks, under each ZeRO stage 0 to 3: only the adapters are in
the optimizer (its Adam state), in ZeRO's partitions and in the moving average; the frozen base does not
move and stays out of the checkpoint; and a resume from that checkpoint (a fresh base, adapters drawn
anew) trains on exactly as the run that never stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ZERO_STAGES = (0, 1, 2, 3)
BEFORE, AFTER = 2, 2  # steps before the checkpoint, and after it


@pytest.mark.e2e  # two gloo ranks through ZeRO 0-3: `make test-e2e`
def test_only_the_adapters_train_checkpoint_and_resume_exactly_under_every_zero_stage(tmp_path):
    from gloo_ranks import run_ranks  # here, not at the top: each rank runs this file as a script

    logs = run_ranks(__file__, tmp_path)
    results = [json.loads(line) for log in logs for line in log.splitlines() if line.startswith('{"zero_stage"')]
    assert sorted((result["zero_stage"], result["rank"]) for result in results) == [(z, r) for z in ZERO_STAGES for r in (0, 1)]
    for result in results:
        adapters, partitioned = result["adapter_elements"], result["zero_stage"] > 0
        # Adam's two moments over this rank's share of the adapters, nothing of the base.
        share = -(-adapters // 2) if partitioned else adapters
        assert share <= result["adam_elements"] / 2 <= share + 64, result  # + ZeRO's alignment padding
        assert result["ema_tensors"] == result["adapter_tensors"] and result["ema_elements"] <= share + 64, result
        assert result["base_moved"] == 0.0 and result["adapters_moved"] > 0, result
        assert result["checkpoint_frozen_keys"] == 0 and result["checkpoint_adapter_keys"] > 0, result
        assert result["resumed_vs_straight"] == 0.0 and result["resumed_ema_vs_straight"] == 0.0, result


def _child(folder: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for zero_stage in ZERO_STAGES:
        _run(Path(folder, f"zero-{zero_stage}"), zero_stage)
    deepspeed.comm.barrier()


def _run(folder: Path, zero_stage: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.core.config import load_config
    from train import masters
    from train.ema import ExponentialMovingAverage, averaged_parameters
    from train.engine import make_engine
    from train.lora import add_adapters
    from train.safe_load import weights_only_loads
    from train.unet import build_unet

    torch.set_num_threads(1)
    rank = dist.get_rank()
    overrides = [f"train.zero_stage={zero_stage}", "train.batch_size_per_worker=2", "train.warmup_steps=0", "train.lr=1e-2"]
    config = load_config(
        "tiny", overrides=[*overrides, "train.ema_decay=0.9", 'train.init_from="base"', "train.lora.rank=4"]
    ).train

    def engine_with_adapters(adapter_seed: int):
        torch.manual_seed(0)  # the same base on every rank and in both engines
        unet = build_unet(config.unet, 32, 8)
        torch.manual_seed(adapter_seed)
        add_adapters(unet, config.lora)
        engine = make_engine(unet, config)
        return engine, ExponentialMovingAverage.of(engine, config)

    def step(engine, ema, number: int) -> None:
        generator = torch.Generator().manual_seed(100 * rank + number)
        noisy, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
        loss = engine(noisy, torch.tensor([10, 500]), encoder_hidden_states=text).sample.pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update()

    def named(engine, adapters: bool) -> dict[str, torch.Tensor]:  # whole module weights; collective under ZeRO-3
        chosen = [(name, p) for name, p in engine.module.named_parameters() if (".lora_" in name) == adapters]
        with deepspeed.zero.GatheredParameters([p for _, p in chosen], enabled=zero_stage == 3):
            return {name: p.detach().float().clone() for name, p in chosen}

    def adapter_masters(engine) -> torch.Tensor:  # collective
        trainable = averaged_parameters(engine.module)
        parts = masters.local_parts(trainable, engine.optimizer)
        return torch.cat([masters.whole_flat(p, part, masters.layout(trainable)) for p, part in zip(trainable, parts)])

    def flat(weights: list[torch.Tensor] | None) -> torch.Tensor | None:  # None off rank 0
        return None if weights is None else torch.cat([weight.flatten() for weight in weights])

    engine, ema = engine_with_adapters(adapter_seed=1)
    base_before, adapters_before = named(engine, False), named(engine, True)
    for number in range(BEFORE):
        step(engine, ema, number)
    checkpoint = folder / "checkpoint"
    engine.save_checkpoint(str(checkpoint), tag="t", exclude_frozen_parameters=True)  # as train.checkpoint saves LoRA
    ema.save(checkpoint)
    for number in range(BEFORE, BEFORE + AFTER):
        step(engine, ema, number)
    straight, straight_ema = adapter_masters(engine), flat(ema.full_weights())
    base_after, adapters_after = named(engine, False), named(engine, True)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's ZeRO wraps the torch AdamW
    adam = sum(state["exp_avg"].numel() + state["exp_avg_sq"].numel() for state in inner.state.values())

    resumed, resumed_ema = engine_with_adapters(adapter_seed=2)  # other adapters: the checkpoint must bring them
    resumed.load_checkpoint(str(checkpoint), tag="t", load_module_strict=False)
    assert resumed_ema.load(checkpoint)
    for number in range(BEFORE, BEFORE + AFTER):
        step(resumed, resumed_ema, number)
    after_resume = adapter_masters(resumed)
    resumed_average = flat(resumed_ema.full_weights())

    module_file = next((checkpoint / "t").glob("*model_states.pt"))
    with weights_only_loads():
        saved = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
    result = {
        "zero_stage": zero_stage,
        "rank": rank,
        "adapter_tensors": len(adapters_before),
        "adapter_elements": sum(t.numel() for t in adapters_before.values()),
        "adam_elements": adam,
        "ema_tensors": len(ema.averages),
        "ema_elements": sum(t.numel() for t in ema.averages),
        "base_moved": max(float((base_after[n] - base_before[n]).abs().max()) for n in base_before),
        "adapters_moved": max(float((adapters_after[n] - adapters_before[n]).abs().max()) for n in adapters_before),
        "checkpoint_frozen_keys": sum(".lora_" not in key for key in saved),
        "checkpoint_adapter_keys": sum(".lora_" in key for key in saved),
        "resumed_vs_straight": float((after_resume - straight).abs().max()),
        # the whole average is joined on rank 0 only
        "resumed_ema_vs_straight": float((resumed_average - straight_ema).abs().max()) if rank == 0 else 0.0,
    }
    print(json.dumps(result), flush=True)
    dist.barrier()


if __name__ == "__main__":
    _child(sys.argv[1])
