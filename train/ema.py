"""An exponential moving average of the UNet's fp32 master weights, kept where the masters are.

It averages the optimizer's fp32 masters (`train.masters`), not the module's weights: under
bf16 these are rounded copies that small updates do not move. Each rank averages the part of
the masters it holds, so the average is spread over the ranks like them: under ZeRO-3 each
parameter's partition, under ZeRO 1-2 the rank's span of the flattened parameters, without
ZeRO the whole. A checkpoint holds each rank's 1/world slice of every flattened average
(`save`), whatever the ZeRO stage, so a resume may change the world size (`load`).
`full_weights` joins the average whole for an export. Frozen parameters (train.freeze) never
move, so only trainable ones are averaged (`averaged_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.core.config import TrainConfig
from train import distributed, masters
from train.masters import Part

EMA_DIR = "ema"  # in a checkpoint folder: rank-R.pt, each rank's part (see `save`)


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates + 1`: `min(decay, (1 + updates) / (10 + updates))`.

    The warmup of diffusers' `EMAModel` (without `use_ema_warmup`): the first updates forget
    the random initial weights fast (0.1, 0.18, 0.25, ...), and `decay` caps it later (0.999
    from about 9,000 updates on).
    """
    return min(decay, (1 + updates) / (10 + updates))


class ExponentialMovingAverage:
    """`average = d * average + (1 - d) * master` after every optimizer step, in fp32, on this rank's part.

    `optimizer` is the engine's (where the masters are, see `train.masters`); without it the
    parameters themselves are averaged.
    """

    def __init__(self, module: torch.nn.Module, decay: float, optimizer=None):
        self.parameters = averaged_parameters(module)
        self.optimizer = optimizer
        self.kind = masters.layout(self.parameters)
        self.decay = decay
        self.restart()

    @classmethod
    def of(cls, engine, config: TrainConfig) -> ExponentialMovingAverage | None:
        """The average of `engine`'s UNet that `train.ema_decay` asks for; None when it is 0 (off)."""
        return cls(engine.module, config.ema_decay, engine.optimizer) if config.ema_decay > 0 else None

    @property
    def partitioned(self) -> bool:
        return self.kind == "partitioned"

    def restart(self) -> None:
        """Start over from the current masters, as if no update had been made."""
        self.updates = 0
        parts = masters.local_parts(self.parameters, self.optimizer)
        self.starts = [part.start for part in parts]
        self.averages = [part.tensor.detach().float().clone() for part in parts]

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step, on every rank (not after a skipped step or a micro-batch
        inside an accumulation window: the weights did not move)."""
        weight = 1.0 - warmed_up_decay(self.decay, self.updates)
        for average, part in zip(self.averages, masters.local_parts(self.parameters, self.optimizer)):
            average.lerp_(part.tensor.detach().float(), weight)
        self.updates += 1

    def save(self, folder: str | Path) -> None:
        """Write this rank's 1/world slice of each flattened average under `folder/ema/rank-R.pt`
        (its ZeRO-3 partition is that slice); call on every rank (collective under ZeRO 1-2)."""
        path = Path(folder, EMA_DIR, f"rank-{distributed.rank()}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = self.averages if self.partitioned else [_slice(self._whole_flat(i)) for i in range(len(self.averages))]
        torch.save({"updates": self.updates, "averages": parts}, path)

    def load(self, folder: str | Path, saved_world: int | None = None) -> bool:
        """Read the average from a checkpoint folder; False (and nothing changed) if it has none.

        With this world size a rank reads its own slices (then, unless they are its ZeRO-3
        partitions, the slices are gathered whole, a collective). A checkpoint of `saved_world`
        other ranks is resharded: each parameter's slices are joined in rank order and cut to
        this rank's part. `whole.pt` (checkpoints before slices) is read as it is.
        """
        world, rank = distributed.world_size(), distributed.rank()
        whole = Path(folder, EMA_DIR, "whole.pt")
        if not self.partitioned and whole.exists():
            state = torch.load(whole, map_location="cpu", weights_only=True)
            flats = [average.flatten() for average in state["averages"]]
            self._check_fits(flats, 1)
            self._adopt(int(state["updates"]), [self._cut(flat, i) for i, flat in enumerate(flats)])
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
            averages.append(self._cut(flat[: masters.numel_of(self.parameters[index])], index))
        self._adopt(int(saved[0]["updates"]), averages)
        return True

    def full_weights(self) -> list[torch.Tensor] | None:
        """The whole averaged parameters, in `averaged_parameters(module)` order and their shapes,
        on rank 0 (None elsewhere); collective under ZeRO 1-3."""
        return masters.whole(self.parameters, self._parts(), self.kind)

    def _parts(self) -> list[Part]:
        return [Part(average, start) for average, start in zip(self.averages, self.starts)]

    def _whole_flat(self, index: int) -> torch.Tensor:
        return masters.whole_flat(self.parameters[index], self._parts()[index], self.kind)

    def _cut(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """This rank's part of a parameter's whole flattened average: where its masters are, zero-padded."""
        start, size = self.starts[index], self.averages[index].numel()
        mine = flat[start : start + size]
        return torch.cat([mine, mine.new_zeros(size - mine.numel())])

    def _adopt(self, updates: int, averages: list[torch.Tensor]) -> None:
        self.updates = updates
        self.averages = [new.to(old.device, torch.float32).reshape(old.shape) for new, old in zip(averages, self.averages)]

    def _check_fits(self, parts: list[torch.Tensor], saved_world: int) -> None:
        numels = [masters.numel_of(parameter) for parameter in self.parameters]
        if len(parts) != len(numels) or any(part.numel() != -(-n // saved_world) for part, n in zip(parts, numels)):
            raise RuntimeError("the checkpoint's EMA does not fit this UNet (another model or ZeRO stage)")


def _slice(flat: torch.Tensor) -> torch.Tensor:
    """This rank's ceil(len / world) elements of `flat`, zero-padded at the end."""
    size = -(-flat.numel() // distributed.world_size())
    mine = flat[distributed.rank() * size : (distributed.rank() + 1) * size]
    return torch.cat([mine, mine.new_zeros(size - mine.numel())])


def averaged_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an average covers: the trainable ones, in `module.parameters()` order."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


@contextlib.contextmanager
def weights_replaced(module: torch.nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Within: `module`'s (whole) averaged parameters hold `weights`, as they are (fp32 stays fp32
    in a bf16 module), and the others fp32 copies of their own; after: their own tensors again."""
    parameters = list(module.parameters())
    own = [parameter.data for parameter in parameters]
    given = dict(zip(map(id, averaged_parameters(module)), weights))
    try:
        for parameter in parameters:
            parameter.data = given[id(parameter)] if id(parameter) in given else parameter.data.float()
        yield
    finally:
        for parameter, data in zip(parameters, own):
            parameter.data = data
