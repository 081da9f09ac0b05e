"""The one place models are loaded: by Hugging Face id, local path, or `builtin:<name>`.

`builtin:` names are the tiny offline models shipped under `pipeline/core/assets/tiny/`
(made by `scripts/make_clip_tokenizer.py` and `scripts/make_tiny_models.py`); they load
through the same `from_pretrained` path as real models.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL
from packaging.version import Version
from transformers import CLIPTextModel, CLIPTokenizer

BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
_BUILTIN_ALIASES = {
    "tiny-vae": "vae",
    "tiny-text-encoder": "text_encoder",
    "clip-tokenizer": "tokenizer",
}
# transformers renamed `torch_dtype` to `dtype` in 4.56 (the old name warns in 5.x).
_HF_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def resolve_model_path(name: str) -> str:
    """`builtin:<x>` -> the shipped `assets/tiny/<x>` folder (aliases: tiny-vae, tiny-text-encoder,
    clip-tokenizer); anything else (Hugging Face id or local path) is returned unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    rest = name[len(BUILTIN_PREFIX) :]
    folder = ASSETS_DIR / _BUILTIN_ALIASES.get(rest, rest)
    if not rest or not folder.is_dir():
        known = sorted(_BUILTIN_ALIASES) + sorted(p.name for p in ASSETS_DIR.glob("*") if p.is_dir())
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_PREFIX + k for k in known)}")
    return str(folder)


def subfolder_kwargs(subfolder: str | None) -> dict:
    """from_pretrained's `subfolder` when one is given."""
    return {"subfolder": subfolder} if subfolder else {}


# Weights load from safetensors only: a pickle-based .bin can run code when unpickled, and
# neither library's weights_only=True fallback gives as clear an error.
_SAFE = {"use_safetensors": True}

# Without accelerate diffusers warns on every load that it falls back to this; say it outright.
DIFFUSERS_LOAD_OPTIONS = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_vae(name: str, dtype: torch.dtype = torch.float32, subfolder: str | None = None) -> AutoencoderKL:
    """An `AutoencoderKL` in eval mode with gradients off."""
    vae = AutoencoderKL.from_pretrained(
        resolve_model_path(name), torch_dtype=dtype, **_SAFE, **DIFFUSERS_LOAD_OPTIONS, **subfolder_kwargs(subfolder)
    )
    return _frozen(vae)


def load_text_encoder(name: str, dtype: torch.dtype = torch.float32, subfolder: str | None = None) -> CLIPTextModel:
    """A `CLIPTextModel` in eval mode with gradients off."""
    model = CLIPTextModel.from_pretrained(
        resolve_model_path(name), **{_HF_DTYPE_KW: dtype}, **_SAFE, **subfolder_kwargs(subfolder)
    )
    return _frozen(model)


def load_tokenizer(name: str, subfolder: str | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer (always via `from_pretrained`; direct construction from files is unreliable)."""
    return CLIPTokenizer.from_pretrained(resolve_model_path(name), **subfolder_kwargs(subfolder))


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict: sorted keys, each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """[B, model_max_length, hidden] last hidden states, SD-style (padded to max length, truncated), fp32.

    Always in fp32, under an autocast or not (encode runs the VAE under one with `encode.precision`):
    captions at encode, the empty caption in the manifest and prompts at sampling must be the same
    function of the text, and the text encoder costs little next to the VAE.
    """
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = tokens.input_ids.to(text_encoder.device)
    with torch.autocast(text_encoder.device.type, enabled=False):
        return text_encoder(input_ids).last_hidden_state


def vae_scaling_factor(vae: AutoencoderKL) -> float:
    """The latent scaling factor from the VAE's config (0.18215 for SD-1.x VAEs)."""
    return float(vae.config.scaling_factor)
