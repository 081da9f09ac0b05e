"""An exponential moving average of the UNet's weights, kept where the weights are.

Under ZeRO 0-2 every rank holds whole parameters, and keeps a whole fp32 average. Under
ZeRO-3 a rank holds only its partition of each parameter (`param.ds_tensor`: elements
`[rank * n, (rank + 1) * n)` of the flattened parameter, the last one zero-padded), and
averages just that, so the average is partitioned like the weights. `full_weights` gathers
it whole for an export. Frozen parameters (train.freeze) never move, so only trainable ones
are averaged (`averaged_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.core.config import TrainConfig
from train import distributed

EMA_DIR = "ema"  # in a checkpoint folder: rank-R.pt, each rank's part (see `save`)


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates + 1`: `min(decay, (1 + updates) / (10 + updates))`.

    The warmup of diffusers' `EMAModel` (without `use_ema_warmup`): the first updates forget
    the random initial weights fast (0.1, 0.18, 0.25, ...), and `decay` caps it later (0.999
    from about 9,000 updates on).
    """
    return min(decay, (1 + updates) / (10 + updates))


def local_tensor(parameter: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of `parameter`: its ZeRO-3 partition, or the parameter itself."""
    return getattr(parameter, "ds_tensor", parameter)


class ExponentialMovingAverage:
    """`average = d * average + (1 - d) * weights` after every optimizer step, in fp32, on this rank's part."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.parameters = averaged_parameters(module)
        self.partitioned = hasattr(self.parameters[0], "ds_tensor")  # ZeRO-3
        self.decay = decay
        self.restart()

    @classmethod
    def of(cls, module: torch.nn.Module, config: TrainConfig) -> ExponentialMovingAverage | None:
        """The average `train.ema_decay` asks for; None when it is 0 (off)."""
        return cls(module, config.ema_decay) if config.ema_decay > 0 else None

    def restart(self) -> None:
        """Start over from the current weights, as if no update had been made."""
        self.updates = 0
        self.averages = [local_tensor(p).detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step, on every rank (not after a skipped step or a micro-batch
        inside an accumulation window: the weights did not move)."""
        weight = 1.0 - warmed_up_decay(self.decay, self.updates)
        for average, parameter in zip(self.averages, self.parameters):
            average.lerp_(local_tensor(parameter).detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        saved = state["averages"]
        shapes = [tuple(t.shape) for t in saved], [tuple(t.shape) for t in self.averages]
        if shapes[0] != shapes[1]:
            raise RuntimeError("the checkpoint's EMA does not fit this UNet (another model, ZeRO stage or world size)")
        self.updates = int(state["updates"])
        self.averages = [s.to(a.device, torch.float32) for s, a in zip(saved, self.averages)]

    def save(self, folder: str | Path) -> None:
        """Write this rank's part under `folder/ema/rank-R.pt`: its ZeRO-3 partition, or under ZeRO 0-2
        its 1/world slice of each flattened average (so that a resume reads 1/world of the average)."""
        path = Path(folder, EMA_DIR, f"rank-{distributed.rank()}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = self.averages if self.partitioned else [self._slice(average.flatten()) for average in self.averages]
        torch.save({"updates": self.updates, "averages": parts}, path)

    def load(self, folder: str | Path, saved_world: int | None = None) -> bool:
        """Read the average from a checkpoint folder; False (and nothing changed) if it has none.

        With this world size a rank reads its own part (under ZeRO 0-2 the parts are then gathered
        whole, a collective). A checkpoint of `saved_world` other ranks is resharded: each
        parameter's parts are joined in rank order, cut to its size and split anew. `whole.pt`
        (checkpoints before parts) is read as it is.
        """
        world, rank = distributed.world_size(), distributed.rank()
        whole = Path(folder, EMA_DIR, "whole.pt")
        if not self.partitioned and whole.exists():
            self.load_state_dict(torch.load(whole, map_location="cpu", weights_only=True))
            return True
        saved_world = saved_world or world
        ranks = [rank] if saved_world == world else list(range(saved_world))
        paths = [Path(folder, EMA_DIR, f"rank-{number}.pt") for number in ranks]
        if not all(path.exists() for path in paths):
            return False
        saved = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
        self._check_fits(saved[0]["averages"], saved_world)
        averages = []
        for index, average in enumerate(self.averages):
            if saved_world == world and self.partitioned:
                averages.append(saved[0]["averages"][index])
                continue
            parts = (
                [part["averages"][index] for part in saved]
                if saved_world != world
                else distributed.all_gather(saved[0]["averages"][index].to(average.device))
            )
            flat = torch.cat([part.flatten().to(average.device) for part in parts])
            if self.partitioned:
                flat = flat[: self.parameters[index].ds_numel]
                averages.append(self._slice(flat, average.numel()).view_as(average))
            else:
                averages.append(flat[: average.numel()].view_as(average))
        self.load_state_dict({"updates": saved[0]["updates"], "averages": averages})
        return True

    def _check_fits(self, parts: list[torch.Tensor], saved_world: int) -> None:
        numels = [p.ds_numel if self.partitioned else a.numel() for p, a in zip(self.parameters, self.averages)]
        if len(parts) != len(numels) or any(part.numel() != -(-n // saved_world) for part, n in zip(parts, numels)):
            raise RuntimeError("the checkpoint's EMA does not fit this UNet (another model or ZeRO stage)")

    @staticmethod
    def _slice(flat: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """This rank's `size` elements of `flat` (ceil(len / world) by default), zero-padded at the end."""
        size = size or -(-flat.numel() // distributed.world_size())
        mine = flat[distributed.rank() * size : (distributed.rank() + 1) * size]
        return torch.cat([mine, mine.new_zeros(size - mine.numel())])

    def full_weights(self) -> list[torch.Tensor] | None:
        """The whole averaged parameters, in `averaged_parameters(module)` order, on rank 0 (None elsewhere).

        Collective under ZeRO-3: each parameter's partitions are gathered, joined in rank
        order and cut to the parameter's size.
        """
        if not self.partitioned:
            return list(self.averages) if distributed.is_rank_zero() else None
        weights = []
        for average, parameter in zip(self.averages, self.parameters):
            parts = distributed.all_gather(average, getattr(parameter, "ds_process_group", None))
            if distributed.is_rank_zero():
                weights.append(torch.cat(parts)[: parameter.ds_numel].view(parameter.ds_shape))
        return weights if distributed.is_rank_zero() else None


def averaged_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an average covers: the trainable ones, in `module.parameters()` order."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


@contextlib.contextmanager
def weights_replaced(module: torch.nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Within: `module`'s (whole) averaged parameters hold `weights`; after: their own values again."""
    parameters = averaged_parameters(module)
    own = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for parameter, weight in zip(parameters, weights):
            parameter.copy_(weight)
        try:
            yield
        finally:
            for parameter, value in zip(parameters, own):
                parameter.copy_(value)
