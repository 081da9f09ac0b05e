"""Everything that knows there are several workers: rank, world size, process group,
seeding, rank-0 logging and the few collectives the loop needs.

Without a process group (tests, one process) every function degrades to the single-rank
answer, so the step code can call them unconditionally.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.config import TrainConfig
from pipeline.core.log import get_logger


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def setup(config: TrainConfig) -> None:
    """Threads, device and DeepSpeed's view of the process group Ray Train already made."""
    import deepspeed

    torch.set_num_threads(config.threads_per_worker)
    if config.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")


def seed_initial_weights(seed: int) -> None:
    """The same initial UNet on every rank and in every run with this seed (DeepSpeed would
    broadcast rank 0's anyway; seeding makes a rerun start from the same weights too)."""
    torch.manual_seed(seed)


def batch_generator(seed: int, worker_rank: int, epoch: int, taken: int) -> torch.Generator:
    """The CPU generator for one micro-batch's dropout, timesteps and noise.

    Seeded by the batch's place in the data order (and the rank), so a resumed run draws
    exactly what the original would have, with no generator state in the checkpoint.
    """
    state = np.random.SeedSequence([seed, worker_rank, epoch, taken]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce)."""
    return _true_on_all_ranks(bool(torch.isfinite(loss).all()), loss.device)


def all_ranks_finite_parameters(module: torch.nn.Module) -> bool:
    """True when the weights are finite on every rank; collective.

    Under ZeRO-3 a rank holds only its partition (`ds_tensor`), and checks that.
    """
    tensors = [getattr(parameter, "ds_tensor", parameter) for parameter in module.parameters()]
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all()  # one device sync, not one per tensor
    return _true_on_all_ranks(bool(finite), tensors[0].device)


def _true_on_all_ranks(value: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if value else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def mean_across_ranks(value: float, device: torch.device | str = "cpu") -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return float(tensor.item())


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (all the same shape), in rank order; collective."""
    if not is_distributed():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return parts


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place; collective."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def full_parameters(engine, zero_stage: int):
    """Context in which `engine.module` holds whole parameters on rank 0.

    ZeRO 0-2 keep full parameters on every rank; ZeRO-3 shards them, so every rank must
    enter this (it is collective) to gather them.
    """
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


_logger = get_logger("train")


def log(message: str) -> None:
    """Log on rank 0 only (per-step lines would otherwise come once per worker). Through the pipeline's
    logger, not print: Ray Train patches print into its logger and also tees it to stdout, which would
    show each line twice."""
    if is_rank_zero():
        _logger.info(message)
