"""LoRA on the UNet (`train.lora`): adapters added through peft as diffusers' LoRA example adds them.

With adapters the base UNet is frozen whole: only the adapters' parameters require gradients, so the
optimizer, ZeRO's partitions and the moving average (all built over the trainable parameters) hold
them alone, and checkpoints leave the frozen base out (`train.checkpoint`: it is `train.init_from`'s).
Exports: `train.checkpoint.export_model`, files: `pipeline.core.lora`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipeline.core import layout
from pipeline.core.config import LoraSettings, TrainConfig
from pipeline.core.lora import ONLINE_DIR, RECORD_FILE, fuse, peft_config, plain_unet, record, save_adapter
from pipeline.core.rundir import RunDir
from train import distributed
from train.ema import weights_replaced
from train.finetune import InitModelError


class LoraTargetError(InitModelError):
    """A target module name matches no layer of the UNet."""


def add_adapters(unet: torch.nn.Module, settings: LoraSettings) -> dict[str, int]:
    """Freeze `unet` and add one trainable adapter per target layer; the counts {trainable, frozen}.

    Raises `LoraTargetError` naming a target that matches no layer (peft only refuses when none matches).
    """
    names = [name for name, _ in unet.named_modules()]
    unmatched = [target for target in settings.target_modules if not any(_matches(name, target) for name in names)]
    if unmatched:
        examples = sorted(
            {name.rsplit(".", 1)[-1] for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
        )
        raise LoraTargetError(
            f"train.lora.target_modules: {', '.join(map(repr, unmatched))} names no layer of the UNet; "
            f"its linear layers end in {', '.join(examples)}"
        )
    unet.requires_grad_(False)
    unet.add_adapter(peft_config(settings))
    counts = {"trainable": 0, "frozen": 0}
    for parameter in unet.parameters():
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    return counts


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' layout (what its LoRA example saves), fp32 copies."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {name: tensor.detach().float().cpu().clone() for name, tensor in state.items()}


def base_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base UNet's weights under their own names (peft moves a wrapped layer's to `<layer>.base_layer`)."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in unet.state_dict().items() if ".lora_" not in name}


def write_export(
    local: str,
    run: RunDir,
    unet: torch.nn.Module,
    online: list[torch.Tensor],
    averaged: list[torch.Tensor] | None,
    train: TrainConfig,
) -> dict[str, str]:
    """Stage a LoRA export in `local` (rank 0, weights whole): the adapter (the average's, and the raw one in
    lora_online/), lora.json, and with train.lora_fuse_export unet/ fused. Returns the run folders it
    shares (the base unet/, saved once per run under train/lora_base/)."""
    settings, fused = train.lora, train.lora_fuse_export
    with weights_replaced(unet, online if averaged is None else averaged):
        save_adapter(local, adapter_state(unet), settings)
        base = base_state(unet)  # fp32 inside: weights_replaced gives frozen bf16 weights as fp32 copies
        if fused:
            fuse(plain_unet(unet.config, base), local).save_pretrained(f"{local}/{layout.EXPORT_UNET}", safe_serialization=True)
        elif not run.exists(f"{layout.TRAIN_LORA_BASE}/{layout.COMMIT_MARKER}"):
            with tempfile.TemporaryDirectory(prefix="lora-base-") as staged:
                plain_unet(unet.config, base).save_pretrained(f"{staged}/{layout.EXPORT_UNET}", safe_serialization=True)
                run.put_dir(staged, layout.TRAIN_LORA_BASE)
            distributed.log(f"saved the LoRA base UNet for the run's exports to {run.path(layout.TRAIN_LORA_BASE)}")
    if averaged is not None:
        with weights_replaced(unet, online):
            save_adapter(Path(local, ONLINE_DIR), adapter_state(unet), settings)
    trainable = sum(tensor.numel() for tensor in online)
    Path(local, RECORD_FILE).write_text(json.dumps(record(settings, train.init_from, fused, trainable), indent=1) + "\n")
    return {} if fused else {layout.EXPORT_UNET: f"{layout.TRAIN_LORA_BASE}/{layout.EXPORT_UNET}"}
