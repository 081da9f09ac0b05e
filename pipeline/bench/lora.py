"""`pipeline bench lora`: a LoRA fine-tune against a full fine-tune of the same base UNet, on the same batches.

Both sides are DeepSpeed engines as the train stage builds them (`train.engine.make_engine`: AdamW,
the preset's ZeRO stage and precision, the moving average) around the tiny preset's UNet, one seeded
base for both; LoRA adds the preset's adapters (`train.lora` defaults, rank 4 on the attention
projections) and freezes the base. Each step is `train.step.train_step` on the same synthetic batch
for both. The steps are timed in alternating blocks (full, LoRA, full, LoRA, ...), so a machine that
drifts slows both alike, after a warm-up of each.

- `optimizer_bytes_ratio`: the optimizer's bytes on this rank (its fp32 parameters where they are not the
  module's, and Adam's state; `pipeline.bench.train.held_bytes`), LoRA over full.
- `step_time_ratio`: the median step's seconds, LoRA over full.
- `checkpoint_bytes_ratio`: the bytes of a checkpoint as the train stage saves one (DeepSpeed's files, with
  the frozen base left out under LoRA, and the moving average), LoRA over full.

It runs in a child process (one gloo rank), so the caller's process holds no process group after it.

    pipeline bench lora --images 2560
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.bench.common import free_port, logger, ratio

DEFAULT_IMAGES = 2560  # 80 timed steps of the preset's batch of 32 on each side (about a minute here)
WARMUP_STEPS = 3
BLOCKS = 4  # alternating timed blocks per side
TEXT_TOKENS = 77  # CLIP's context: the text embeddings' length
log = logger("lora")


def run_bench(images: int = DEFAULT_IMAGES, cpus: int = 2) -> dict[str, Any]:
    from pipeline.core.config import load_config

    config = load_config("tiny", overrides=['train.init_from="bench-base"', "train.lora={}"])
    steps = max(BLOCKS, images // config.train.batch_size_per_worker)
    log(f"{steps} timed steps of {config.train.batch_size_per_worker} samples on each side, in {BLOCKS} alternating blocks")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(_measure, (config.model_dump(mode="json"), steps))
    full, lora = measured["full"], measured["lora"]
    return {
        "bench": "lora",
        "optimizer_bytes_ratio": ratio(lora["optimizer_bytes"], full["optimizer_bytes"]),
        "step_time_ratio": ratio(lora["step_seconds"], full["step_seconds"]),
        "checkpoint_bytes_ratio": ratio(lora["checkpoint_bytes"], full["checkpoint_bytes"]),
        "full": full,
        "lora": lora,
        "steps_each": steps,
        "zero_stage": config.train.zero_stage,
        "precision": config.train.precision,
        "threads": config.train.threads_per_worker,
        "device": "cpu",
    }


def _measure(config_json: dict, steps: int) -> dict[str, dict]:
    import deepspeed
    import torch

    from pipeline.core import log as logs
    from pipeline.core.config import PipelineConfig

    logs.setup_driver()  # a spawned process: its progress lines need the console set up again
    config = PipelineConfig.model_validate(config_json)
    train = config.train
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(train.threads_per_worker)
    deepspeed.init_distributed(dist_backend="gloo")
    width = _text_width(config)  # the text encoder is loaded once, for its width
    sides = {"full": _Side(config, width, lora=False), "lora": _Side(config, width, lora=True)}
    batch = _batch(config, width)
    for side in sides.values():
        for _ in range(WARMUP_STEPS):
            side.step(batch)
    times: dict[str, list[float]] = {name: [] for name in sides}
    per_block = -(-steps // BLOCKS)
    for block in range(BLOCKS):
        for name, side in sides.items():
            for _ in range(per_block):
                times[name].append(side.step(batch))
        log(
            f"block {block + 1}/{BLOCKS}: full {statistics.median(times['full']):.3f} s/step, LoRA {statistics.median(times['lora']):.3f}"
        )
    result = {}
    for name, side in sides.items():
        seconds = statistics.median(times[name])
        result[name] = {
            "trainable_parameters": side.trainable,
            "optimizer_bytes": side.optimizer_bytes(),
            "step_seconds": round(seconds, 4),
            "samples_per_s": round(train.batch_size_per_worker / seconds, 1),
            "checkpoint_bytes": side.checkpoint_bytes(),
        }
    return result


def _batch(config, width: int) -> dict:
    """One synthetic batch of the preset's shapes (latents, text embeddings `width` wide), drawn once."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    size, side = config.train.batch_size_per_worker, config.encode.resolution // 8
    return {
        "latents": torch.randn(size, 4, side, side, generator=generator),
        "text_embeddings": torch.randn(size, TEXT_TOKENS, width, generator=generator),
    }


def _text_width(config) -> int:
    from pipeline.core.models import load_text_encoder

    return load_text_encoder(config.encode.text_encoder).config.hidden_size


class _Side:
    """One engine (full fine-tune or LoRA) on the seeded base UNet, with its moving average."""

    def __init__(self, config, width: int, lora: bool):
        import torch

        from train.ema import ExponentialMovingAverage
        from train.engine import make_engine
        from train.lora import add_adapters
        from train.step import loss_options, make_noise_scheduler
        from train.unet import build_unet

        train = config.train if lora else config.train.model_copy(update={"lora": None})
        self.config, self.lora = config, lora
        torch.manual_seed(config.seed)  # the same base on both sides
        unet = build_unet(train.unet, width, config.encode.resolution // 8)
        if lora:
            add_adapters(unet, train.lora)
        self.trainable = sum(parameter.numel() for parameter in unet.parameters() if parameter.requires_grad)
        self.engine = make_engine(unet, train)
        self.ema = ExponentialMovingAverage.of(self.engine, train)
        self.noise_scheduler, self.options = make_noise_scheduler(train), loss_options(train)
        self.empty = torch.zeros(TEXT_TOKENS, width)  # the empty caption's embedding
        self.generator = torch.Generator().manual_seed(config.seed)

    def step(self, batch: dict) -> float:
        from train.step import train_step

        started = time.perf_counter()
        train = self.config.train
        train_step(self.engine, batch, self.noise_scheduler, self.empty, train.caption_dropout, self.generator, **self.options)
        if self.ema is not None:
            self.ema.update()
        return time.perf_counter() - started

    def optimizer_bytes(self) -> int:
        from pipeline.bench.train import held_bytes

        return held_bytes(self.engine)["optimizer_state"]

    def checkpoint_bytes(self) -> int:
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
            self.engine.save_checkpoint(folder, tag="bench", exclude_frozen_parameters=self.lora)
            if self.ema is not None:
                self.ema.save(folder)
            return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
