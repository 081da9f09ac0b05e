"""The DeepSpeed engine around the UNet: AdamW, warmup-then-cosine/constant schedule, ZeRO."""

from __future__ import annotations

import logging

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.core.config import TrainConfig, deep_merge
from train.step import learning_rate_factor


def deepspeed_config(config: TrainConfig, hidden_size: int | None = None) -> dict:
    """DeepSpeed's JSON config for one worker's micro-batch; the global batch is derived from it.

    Under ZeRO-3, parameters smaller than `10 * hidden_size` elements stay whole on every rank
    (what Hugging Face's integration sets for "auto"); DeepSpeed's own default, 1e5 elements, is
    sized for billion-parameter models and would keep 44% of the tiny UNet unpartitioned.
    `train.deepspeed` is merged over it, table by table (the config refuses the keys set here
    from other train keys, see `pipeline.core.config.DEEPSPEED_OWNED_KEYS`); it can set that threshold.
    """
    zero = {"stage": config.zero_stage}
    if config.zero_stage == 3 and hidden_size:
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    generated = {
        "train_micro_batch_size_per_gpu": config.batch_size_per_worker,
        "gradient_accumulation_steps": config.gradient_accumulation,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        # Gradients are averaged over the workers in fp32: DeepSpeed's default under bf16/fp16 is the
        # low precision, where a sum over 64 workers loses the small ones.
        "communication_data_type": "fp32",
        # We log ourselves (train.metrics); DeepSpeed's own step prints would only interleave.
        "steps_per_print": 2**31 - 1,
        # train.profile reads DeepSpeed's backward, reduce and step timers (train.profile).
        "wall_clock_breakdown": config.profile,
    }
    if config.precision != "fp32" and config.zero_stage > 0:
        # ...and summed over micro-batches and kept until the step in fp32 (DeepSpeed keeps them in
        # the model's dtype by default, and refuses fp32 without ZeRO).
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    return deep_merge(generated, config.deepspeed)


def make_engine(unet: torch.nn.Module, config: TrainConfig):
    """deepspeed.initialize on the process group Ray Train made (see train.distributed.setup)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Only trainable parameters (train.freeze): ZeRO then keeps gradients and Adam state for these alone.
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(step, config.warmup_steps, config.max_steps, config.lr_schedule),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=unet,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(config, hidden_size=max(unet.config.block_out_channels)),
        dist_init_required=False,
    )
    if config.profile:
        # DeepSpeed prints its timers every step whatever the log level, and resets them as it does: keep
        # the reset, drop the print (train.profile reads get_wall_clock_timers, the step's values).
        engine.timers.log = lambda names, *args, **kwargs: [engine.timers(name).reset() for name in names]
    return engine


def restart_schedule(engine, config: TrainConfig) -> None:
    """After a resume, take the peak lr and schedule from this run's config, not the checkpoint's.

    The restored scheduler would otherwise keep the old peak lr, and the optimizer the lr the old
    schedule set last (0 at the end of a finished cosine run that is now being extended).
    """
    schedule = engine.lr_scheduler
    schedule.base_lrs = [config.lr for _ in schedule.base_lrs]
    factor = learning_rate_factor(schedule.last_epoch, config.warmup_steps, config.max_steps, config.lr_schedule)
    for group in schedule.optimizer.param_groups:
        group["lr"] = config.lr * factor
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
