"""DeepSpeed's checkpoint files, read without running code from them.

DeepSpeed unpickles its `.pt` files with `torch.load(weights_only=False)` (its checkpoint engine,
`ds_to_universal`, the universal loader), so a file planted in a run directory would run what its
pickle says on every worker that resumes. Within `weights_only_loads()` every `torch.load` is made
with `weights_only=True` and an allowlist of the few DeepSpeed classes its state holds (found by
saving the tiny UNet under ZeRO 1, 2 and 3 in fp32 and bf16, and its universal form); a file that
needs anything else is refused with `UnsafeCheckpointError`, before any of it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs more than tensors and DeepSpeed's plain state to load; never unpickled."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def allowed_globals() -> list:
    """What DeepSpeed's optimizer state pickles besides tensors and builtins: the ZeRO stage (an
    enum), the loss scaler's attributes (fp16's dynamic one too) and the fragment addresses of bf16
    and ZeRO 1-2. Rebuilding them calls no code beyond their constructors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _name(file) -> str:
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else getattr(file, "name", repr(file))


def _what(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (a global's name, when it says), from its message."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]  # the first is torch's general advice
    return lines[1] if len(lines) > 2 else lines[-1] if lines else type(error).__name__


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's included) loads with `weights_only=True` and `allowed_globals`."""
    original = torch.load
    allowed = allowed_globals()

    def load(file, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
        try:
            with torch.serialization.safe_globals(allowed):
                return original(file, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)
        except pickle.UnpicklingError as error:
            path = _name(file)
            raise UnsafeCheckpointError(
                path,
                f"{path} is not a DeepSpeed checkpoint file this pipeline writes: unpickling it needs {_what(error)} "
                "(refused, nothing of it ran; torch.load weights_only=True). Someone or something wrote into the "
                "run directory: remove that checkpoint folder, or resume from a copy you trust",
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
