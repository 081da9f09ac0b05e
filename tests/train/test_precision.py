"""bf16 training keeps fp32 where it matters: the average of the fp32 master weights, fp32 exports
of them, and gradients averaged over the workers (and, under ZeRO, summed) in fp32. Two real
DeepSpeed ranks on gloo, under each ZeRO stage, 0 to 3."""

from __future__ import annotations

import json
import sys

import pytest

STEPS = 3
ZERO_STAGES = (0, 1, 2, 3)


@pytest.mark.e2e  # two gloo ranks through ZeRO 0-3 (about half a minute): `make test-e2e`, keeping `make test` under 8 minutes
def test_bf16_keeps_the_average_exports_and_gradient_sums_in_fp32(tmp_path):
    from gloo_ranks import run_ranks  # here, not at the top: each rank runs this file as a script

    logs = run_ranks(__file__, tmp_path)
    lines = logs[0].splitlines()
    results = [json.loads(line) for line in lines if line.startswith('{"zero_stage"')]
    assert [result["zero_stage"] for result in results] == list(ZERO_STAGES)
    for result in results:
        check(result)


def check(result: dict) -> None:
    assert result["communication_dtype"] == "torch.float32"
    # The tiny preset's updates (lr 1e-3) fall below bf16's rounding step on most weights: the masters
    # moved, the module did not.
    assert result["masters_off_the_module"] > 0.5
    assert result["average_vs_masters_reference"] < 1e-6  # the EMA the test computed from the whole masters
    assert result["average_vs_module_reference"] > 1e-4  # what averaging the bf16 weights would have given
    assert result["export_dtypes"] == {"unet": ["torch.float32"], "unet_online": ["torch.float32"]}
    assert result["online_vs_masters"] == 0.0 and result["exported_average_vs_average"] == 0.0
    # Averaged in fp32, a gradient is the mean of two bf16 values, most of which bf16 cannot hold.
    if result["zero_stage"] > 0:  # without ZeRO, DeepSpeed keeps gradients in bf16 (it refuses fp32 accumulation)
        assert result["gradients_finer_than_bf16"] > 0.3


def _child(folder: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for zero_stage in ZERO_STAGES:
        _train_and_export(f"{folder}/zero-{zero_stage}", zero_stage)
    deepspeed.comm.barrier()


def _train_and_export(folder: str, zero_stage: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from diffusers import UNet2DConditionModel

    from pipeline.core import layout
    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir
    from train.checkpoint import export_model
    from train.ema import ExponentialMovingAverage, averaged_parameters, warmed_up_decay
    from train.engine import make_engine
    from train.unet import build_unet

    torch.set_num_threads(1)
    rank = dist.get_rank()
    overrides = [f"train.zero_stage={zero_stage}", 'train.precision="bf16"', "train.batch_size_per_worker=2"]
    config = load_config("tiny", overrides=[*overrides, "train.warmup_steps=0", "train.ema_decay=0.9"]).train
    torch.manual_seed(0)
    engine = make_engine(build_unet(config.unet, 32, 8), config)
    ema = ExponentialMovingAverage.of(engine, config)
    trainable = averaged_parameters(engine.module)

    def whole_masters() -> list[torch.Tensor]:  # collective
        if zero_stage == 0:  # FP16_UnfusedOptimizer's fp32 copies, which DeepSpeed's helper does not read
            return [copy.flatten().clone() for copy in engine.optimizer.fp32_groups[0]]
        return [safe_get_full_fp32_param(parameter).float().flatten() for parameter in trainable]

    def module_weights() -> list[torch.Tensor]:  # collective under ZeRO-3
        with deepspeed.zero.GatheredParameters(trainable, enabled=zero_stage == 3):
            return [parameter.detach().float().flatten().clone() for parameter in trainable]

    from_masters, from_module = whole_masters(), module_weights()
    finer = []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(10 * rank + step)
        noisy = torch.randn(2, 4, 8, 8, generator=generator).bfloat16()
        text = torch.randn(2, 77, 32, generator=generator).bfloat16()
        loss = engine(noisy, torch.tensor([10, 500]), encoder_hidden_states=text).sample.float().pow(2).mean()
        engine.backward(loss)
        if zero_stage > 0:
            grads = torch.cat([safe_get_full_grad(parameter).float().flatten() for parameter in trainable])
            finer.append(float((grads != grads.bfloat16().float()).float().mean()))
        engine.step()
        ema.update()
        weight = 1 - warmed_up_decay(0.9, step)
        from_masters = [a.lerp(b, weight) for a, b in zip(from_masters, whole_masters())]
        from_module = [a.lerp(b, weight) for a, b in zip(from_module, module_weights())]

    masters, module = torch.cat(whole_masters()), torch.cat(module_weights())
    averaged = ema.full_weights()
    run = RunDir(f"{folder}/run")
    export_model(engine, run, config, STEPS, ema)
    if rank == 0:
        averaged = torch.cat([weight.flatten() for weight in averaged])
        export = run.path(f"{layout.TRAIN_EXPORT}/{layout.step_name(STEPS)}")
        loaded = {
            name: UNet2DConditionModel.from_pretrained(f"{export}/{name}", torch_dtype=None)
            for name in (layout.EXPORT_UNET, layout.EXPORT_UNET_ONLINE)
        }
        trainable_names = [name for name, parameter in engine.module.named_parameters() if parameter.requires_grad]

        def flat(model) -> torch.Tensor:
            state = model.state_dict()
            return torch.cat([state[name].flatten() for name in trainable_names])

        print(
            json.dumps(
                {
                    "zero_stage": zero_stage,
                    "communication_dtype": str(engine.communication_data_type),
                    "masters_off_the_module": float((masters != module).float().mean()),
                    "average_vs_masters_reference": float((averaged - torch.cat(from_masters)).abs().max()),
                    "average_vs_module_reference": float((averaged - torch.cat(from_module)).abs().max()),
                    "export_dtypes": {
                        name: sorted({str(tensor.dtype) for tensor in model.state_dict().values()})
                        for name, model in loaded.items()
                    },
                    "online_vs_masters": float((flat(loaded[layout.EXPORT_UNET_ONLINE]) - masters).abs().max()),
                    "exported_average_vs_average": float((flat(loaded[layout.EXPORT_UNET]) - averaged).abs().max()),
                    "gradients_finer_than_bf16": min(finer, default=None),
                }
            )
        )
    dist.barrier()


if __name__ == "__main__":
    _child(sys.argv[1])
