"""Fine-tuning: a UNet started from a diffusers-format model (`train.init_from`), and frozen parameters (`train.freeze`).

The init model is a local folder or a Hugging Face id (loaded from the local cache, downloaded
first when online). A folder holding `unet/` instead of a `config.json` (a run's export folder
RUN/train/export/step-N, or a Stable Diffusion repo) means its `unet/`. Only safetensors weights
load. The driver checks the model against the latents and the noise schedule before any
worker starts (`check_init`), and the train stage's fingerprint includes a SHA-256 of its
config and weight files (`init_fingerprint`), so other weights under the same name retrain.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import layout
from pipeline.core.config import TrainConfig

CONFIG_FILE = "config.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
WEIGHTS_GLOB = "diffusion_pytorch_model*.safetensors"  # one file, or shards next to their index


class InitModelError(ValueError):
    """The init model cannot be found or does not fit this run; the message names both sides."""


@dataclass(frozen=True)
class InitModel:
    """Where `train.init_from` resolved to: the UNet's local folder, and its scheduler's if it has one."""

    folder: Path
    scheduler_folder: Path | None

    def unet_config(self) -> dict[str, Any]:
        return json.loads((self.folder / CONFIG_FILE).read_text())

    def scheduler_config(self) -> dict[str, Any] | None:
        if self.scheduler_folder is None or not (self.scheduler_folder / SCHEDULER_CONFIG_FILE).is_file():
            return None
        return json.loads((self.scheduler_folder / SCHEDULER_CONFIG_FILE).read_text())

    def weight_files(self) -> list[Path]:
        files = sorted(self.folder.glob(WEIGHTS_GLOB))
        if not files:
            raise InitModelError(f"train.init_from: {self.folder} has no {WEIGHTS_GLOB} (only safetensors weights are loaded)")
        return files

    def sha256(self) -> str:
        """Of config.json and the weight files, in name order (the bytes that decide what loads)."""
        return _files_sha256(tuple((path, *_stat(path)) for path in [self.folder / CONFIG_FILE, *self.weight_files()]))


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _files_sha256(files: tuple[tuple[Path, int, int], ...]) -> str:
    """Cached by (path, size, mtime): every `pipeline` command fingerprints the train stage."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve(train: TrainConfig) -> InitModel | None:
    """`train.init_from` as a local folder (relative paths from the current directory); None when unset."""
    if not train.init_from:
        return None
    root = Path(train.init_from).expanduser()
    if not root.exists():
        root = _download(train.init_from, train.init_subfolder)
    folder = root / train.init_subfolder if train.init_subfolder else root
    in_subfolder = bool(train.init_subfolder)
    if not in_subfolder and not (folder / CONFIG_FILE).is_file() and (folder / layout.EXPORT_UNET / CONFIG_FILE).is_file():
        folder, in_subfolder = folder / layout.EXPORT_UNET, True  # an export folder or a pipeline repo
    if in_subfolder and not train.init_subfolder:
        _refuse_adapter_export(folder.parent)
    if not (folder / CONFIG_FILE).is_file():
        hint = "" if train.init_subfolder else " (set train.init_subfolder if the UNet is in a subfolder)"
        raise InitModelError(f"train.init_from: {folder} holds no diffusers UNet ({CONFIG_FILE} is missing){hint}")
    folder = folder.resolve()
    # Exports and pipeline repos keep the UNet's noise schedule in a sibling scheduler/.
    return InitModel(folder, folder.parent / layout.EXPORT_SCHEDULER if in_subfolder else None)


def _refuse_adapter_export(export: Path) -> None:
    """A LoRA export's unet/ is its base: starting from it would leave the adapter out."""
    from pipeline.core.lora import ADAPTER_FILE, read_record

    saved = read_record(export)
    if saved is not None and saved["unet"] == "base":
        raise InitModelError(
            f"train.init_from: {export} is a LoRA export: its unet/ is the base, without the adapter in {ADAPTER_FILE}; "
            "start from the run's base again (with train.lora, resume the run itself), or export with "
            "train.lora_fuse_export = true, whose unet/ holds the adapter fused in"
        )


def worker_folder(train: TrainConfig, driver_folder: str | None) -> Path:
    """The folder a worker loads: the driver's, where it exists on this machine (a relative
    init_from means nothing in a worker's directory), else resolved again (a Hugging Face id
    on another node)."""
    if driver_folder and Path(driver_folder, CONFIG_FILE).is_file():
        return Path(driver_folder)
    return resolve(train).folder


def _download(repo_id: str, subfolder: str | None) -> Path:
    """A Hugging Face model's snapshot folder: only the UNet's files and the scheduler's config."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}{CONFIG_FILE}", f"{prefix}diffusion_pytorch_model*", f"{layout.EXPORT_SCHEDULER}/*.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline and not cached, no such repo, a malformed id, ...
        raise InitModelError(
            f"train.init_from: {repo_id!r} is neither a local folder nor a Hugging Face model this machine can load "
            f"({type(error).__name__}: {error})"
        ) from error


def init_fingerprint(train: TrainConfig) -> str | None:
    """What the train stage's fingerprint adds for the init model: its files' SHA-256 (None when unset).

    A model that cannot be resolved gives a marker instead of an error, so that commands that only
    chain fingerprints still run; the train stage itself then fails with the reason.
    """
    if not train.init_from:
        return None
    try:
        return resolve(train).sha256()
    except (InitModelError, OSError) as error:
        return f"unavailable: {error}"


def load_unet(folder: Path, sample_size: int):
    """The init UNet in fp32, its config's sample_size set to the latents' (so the export describes them)."""
    import torch
    from diffusers import UNet2DConditionModel

    from pipeline.core.models import DIFFUSERS_LOAD_OPTIONS

    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True, **DIFFUSERS_LOAD_OPTIONS)
    if unet.config.sample_size != sample_size:
        unet.register_to_config(sample_size=sample_size)
    return unet


def check_init(
    init: InitModel, train: TrainConfig, latent_shape: list[int], text_shape: list[int], class_embeds: int | None = None
) -> None:
    """Raise `InitModelError` unless the init UNet fits the latents, the text embeddings, the noise schedule
    and the class count (`class_embeds`: classes plus the null class; None: no class embedding)."""
    config, where = init.unet_config(), f"the init model {init.folder}"
    problems = []
    if config.get("num_class_embeds") != class_embeds or config.get("class_embed_type"):
        wanted = f"{class_embeds} ({class_embeds - 1} classes + the null class)" if class_embeds else "none (text conditioning)"
        problems.append(
            f"num_class_embeds = {config.get('num_class_embeds')} (class_embed_type {config.get('class_embed_type')!r}) "
            f"in {where}, but train.conditioning = {train.conditioning!r} with these latents needs {wanted}"
        )
    channels = latent_shape[0]
    for key in ("in_channels", "out_channels"):
        if config.get(key) != channels:
            problems.append(f"{key} = {config.get(key)} in {where}, but the latents have {channels} channels")
    # encoder_hid_dim, when set, projects the text embeddings to cross_attention_dim first.
    key = "encoder_hid_dim" if config.get("encoder_hid_dim") else "cross_attention_dim"
    wanted = config.get(key)
    if any(value != text_shape[-1] for value in (wanted if isinstance(wanted, list) else [wanted])):
        problems.append(f"{key} = {wanted} in {where}, but the text embeddings are {text_shape[-1]} wide")
    if config.get("addition_embed_type"):
        problems.append(
            f"addition_embed_type = {config['addition_embed_type']!r} in {where} (SDXL-style extra conditioning), which training does not feed"
        )
    problems += schedule_mismatches(init, train)
    if problems:
        raise InitModelError("train.init_from does not fit this run:\n  " + "\n  ".join(problems))
    init.weight_files()  # fail here, not in every worker, when there are no safetensors weights


def schedule_mismatches(init: InitModel, train: TrainConfig) -> list[str]:
    """How the noise schedule the init UNet learned (its sibling scheduler/, if any) differs from the configured one.

    Sampling uses the export's schedule, which is the configured one; a UNet fine-tuned under
    another prediction type or schedule starts from weights that predict something else.
    """
    from train.step import make_noise_scheduler

    saved = init.scheduler_config()
    if saved is None:
        return []
    from diffusers import DDPMScheduler

    theirs, ours = DDPMScheduler.from_config(saved).config, make_noise_scheduler(train).config
    keys = {"prediction_type": "prediction_type", "beta_schedule": "noise_schedule", "num_train_timesteps": "num_train_timesteps"}
    if ours.beta_schedule in ("linear", "scaled_linear"):  # the cosine schedule has no betas to set
        keys |= {"beta_start": "beta_start", "beta_end": "beta_end"}
    return [
        f"train.{ours_key} = {ours[key]!r}, but {init.scheduler_folder} says {key} = {theirs[key]!r}"
        for key, ours_key in keys.items()
        if theirs[key] != ours[key]
    ]


def matches(name: str, pattern: str) -> bool:
    """A parameter name matches a dotted prefix of it, or a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def freeze(module, patterns: list[str]) -> dict[str, int]:
    """requires_grad=False on the parameters `patterns` match; their counts {trainable, frozen}.

    Raises `InitModelError` naming a pattern that matches nothing (a typo would otherwise train
    everything), or when nothing is left to train.
    """
    names = [name for name, _ in module.named_parameters()]
    unmatched = [pattern for pattern in patterns if not any(matches(name, pattern) for name in names)]
    if unmatched:
        top = sorted({name.split(".")[0] for name in names})
        raise InitModelError(
            f"train.freeze: {', '.join(map(repr, unmatched))} {'matches' if len(unmatched) == 1 else 'match'} no parameter "
            "of the UNet; names start with "
            f"{', '.join(top)} (a dotted prefix such as 'down_blocks.0', or a glob such as '*.attn2.*')"
        )
    counts = {"trainable": 0, "frozen": 0}
    for name, parameter in module.named_parameters():
        if any(matches(name, pattern) for pattern in patterns):
            parameter.requires_grad_(False)
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    if patterns and counts["trainable"] == 0:
        raise InitModelError(f"train.freeze = {patterns} freezes every parameter: nothing is left to train")
    return counts


def make_trainable(unet, train: TrainConfig) -> dict[str, int]:
    """What trains, and the counts {trainable, frozen}: with train.lora its adapters alone (added here),
    else every parameter train.freeze leaves."""
    if train.lora is not None:
        from train.lora import add_adapters

        return add_adapters(unet, train.lora)
    return freeze(unet, train.freeze)


def meta_unet(
    train: TrainConfig, init: InitModel | None, cross_attention_dim: int, sample_size: int, class_embeds: int | None = None
):
    """The UNet training will build, on the meta device (names and shapes, no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from train.unet import build_unet

    if init is None:
        return build_unet(train.unet, cross_attention_dim, sample_size, on_meta=True, num_class_embeds=class_embeds)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(init.unet_config())
