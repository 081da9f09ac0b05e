"""The fp32 master weights behind a DeepSpeed engine's parameters: the part this rank holds, and
the whole of each, assembled.

Under bf16/fp16 the module holds rounded copies: the optimizer updates fp32 masters and casts
them back, so an update below the rounding step (lr 1e-4 on a weight of 0.1 is a quarter of
bf16's) moves the master and leaves the module's weight where it was. The average (train.ema)
and the exports read the masters, not the module.

Where a rank's part lives, by optimizer (`Part.start` says where it sits in the flattened parameter):
- ZeRO-3: the parameter's partition, elements `[rank * n, (rank + 1) * n)` of the flattened
  parameter zero-padded to `world * n` (DeepSpeed's `safe_get_local_fp32_param`; `ds_tensor`
  covers the same span).
- ZeRO 1-2: a rank owns a span of the flattened parameter group, so a parameter may be split
  between ranks or have no part here (`param._hp_mapping`: the fp32 view and where it sits).
- ZeRO-0 under bf16/fp16 (DeepSpeed's FP16_Optimizer or FP16_UnfusedOptimizer): whole fp32 copies.
- fp32 without ZeRO, or no engine: the parameter itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from train import distributed

Layout = Literal["partitioned", "fragments", "whole"]


@dataclass(frozen=True)
class Part:
    """What this rank holds of one parameter, fp32 and flat."""

    tensor: torch.Tensor
    """Elements `[start, start + numel)` of the flattened (under ZeRO-3: zero-padded) parameter; may be empty."""
    start: int


def layout(parameters: list[torch.nn.Parameter]) -> Layout:
    """How the parts of these (trainable) parameters are spread over the ranks."""
    if any(hasattr(parameter, "ds_tensor") for parameter in parameters):
        return "partitioned"
    if any(hasattr(parameter, "_hp_mapping") for parameter in parameters):
        return "fragments"
    return "whole"


def local_parts(parameters: list[torch.nn.Parameter], optimizer=None) -> list[Part]:
    """This rank's fp32 master part of each parameter (views: they follow the optimizer's updates).

    `optimizer` is the engine's (`engine.optimizer`); without it, or where DeepSpeed keeps no
    masters (fp32 without ZeRO), a part is the parameter itself.
    """
    whole_masters = _fp16_optimizer_masters(optimizer)
    parts = []
    for parameter in parameters:
        if hasattr(parameter, "ds_tensor"):
            size = parameter.ds_tensor.numel()
            master = _zero_3_master(parameter) if hasattr(parameter, "_z3_optimizer") else parameter.ds_tensor
            parts.append(Part(master.view(-1), distributed.rank() * size))
        elif hasattr(parameter, "_hp_mapping"):
            mapping = parameter._hp_mapping
            if mapping is None:  # no element of it on this rank
                parts.append(Part(parameter.new_empty(0, dtype=torch.float32), 0))
            else:
                parts.append(Part(mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start))
        elif id(parameter) in whole_masters:
            parts.append(Part(whole_masters[id(parameter)], 0))
        else:
            parts.append(Part(parameter.detach().view(-1), 0))
    return parts


def whole(parameters: list[torch.nn.Parameter], parts: list[Part], kind: Layout) -> list[torch.Tensor] | None:
    """Each parameter's whole fp32 tensor, in its shape, joined from every rank's `parts` on rank 0;
    None elsewhere. Collective unless `kind` is "whole".

    One parameter at a time, so a rank holds at most one whole parameter besides its parts.
    """
    joined = []
    for parameter, part in zip(parameters, parts):
        flat = whole_flat(parameter, part, kind)
        if distributed.is_rank_zero():
            joined.append(flat.view(shape(parameter)).cpu())  # not another copy of the model on rank 0's GPU
    return joined if distributed.is_rank_zero() else None


def whole_flat(parameter: torch.nn.Parameter, part: Part, kind: Layout) -> torch.Tensor:
    """The whole flattened fp32 parameter, from each rank's `part`; collective (on every rank) for
    "partitioned" and "fragments": every rank places its part in zeros, and the ranks sum."""
    if kind == "whole":
        return part.tensor.float().view(-1)
    numel = numel_of(parameter)
    size = part.tensor.numel() * distributed.world_size() if kind == "partitioned" else numel
    buffer = part.tensor.new_zeros(size, dtype=torch.float32)
    buffer[part.start : part.start + part.tensor.numel()] = part.tensor.float()
    distributed.all_reduce(buffer)
    return buffer[:numel]


def numel_of(parameter: torch.nn.Parameter) -> int:
    """The parameter's number of elements (under ZeRO-3 the whole one's, not the partition's)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def shape(parameter: torch.nn.Parameter) -> torch.Size:
    return getattr(parameter, "ds_shape", parameter.shape)


def _zero_3_master(parameter: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(parameter)


def _fp16_optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 copy (flat) under DeepSpeed's FP16_Optimizer or FP16_UnfusedOptimizer
    (ZeRO-0 under bf16/fp16): the fused one keeps one flat copy per group, the unfused one a copy per parameter."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    masters = {}
    if hasattr(optimizer, "fp32_groups_flat"):
        for group, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for parameter in group:
                masters[id(parameter)] = flat.narrow(0, offset, parameter.numel())
                offset += parameter.numel()
    elif hasattr(optimizer, "fp32_groups"):
        for group, copies in zip(groups, optimizer.fp32_groups):
            masters.update({id(parameter): copy.view(-1) for parameter, copy in zip(group, copies)})
    return masters
