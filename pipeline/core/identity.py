"""Which encoders made the latents, and refusing latents that other encoders made.

The encode manifest records, for the VAE and the text encoder, the name each was loaded by and
a SHA-256 of its weights. Training and sampling compare that with the encoders their own
config names. The weights decide: the same weights under another path or id are accepted;
other weights are an error naming both sides, because a UNet trained on one VAE's latents
produces noise through another's decoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core import layout
from pipeline.core.config import EncodeConfig

KINDS = ("vae", "text_encoder")


class EncoderMismatchError(ValueError):
    """The encoders a stage is configured with are not the ones that made its latent shards."""


@dataclass
class Encoders:
    """The models an `EncodeConfig` names, loaded once (eval mode, no gradients)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any

    @classmethod
    def load(cls, config: EncodeConfig, dtype: torch.dtype = torch.float32) -> Encoders:
        from pipeline.core import models  # diffusers and transformers: seconds to import, only when loading

        return cls(
            vae=models.load_vae(config.vae, dtype=dtype, subfolder=config.vae_subfolder),
            text_encoder=models.load_text_encoder(
                config.text_encoder,
                dtype=dtype,
                subfolder=config.text_encoder_subfolder,
            ),
            tokenizer=models.load_tokenizer(config.tokenizer, subfolder=config.tokenizer_subfolder),
        )

    def records(self, config: EncodeConfig) -> dict[str, dict[str, Any]]:
        """The manifest's identity records for these models, as `config` names them."""
        from pipeline.core import models

        return {
            "vae": {
                "id": config.vae,
                "subfolder": config.vae_subfolder,
                "weights_sha256": models.weights_sha256(self.vae),
                "scaling_factor": models.vae_scaling_factor(self.vae),
            },
            "text_encoder": {
                "id": config.text_encoder,
                "subfolder": config.text_encoder_subfolder,
                "weights_sha256": models.weights_sha256(self.text_encoder),
            },
            "tokenizer": {
                "id": config.tokenizer,
                "subfolder": config.tokenizer_subfolder,
                "max_length": self.tokenizer.model_max_length,
                "vocab_sha256": tokenizer_sha256(self.tokenizer),
            },
        }


# Token ids of these exercise the BPE merges, which the vocabulary alone does not fix.
_PROBES = ("a photograph of an astronaut riding a horse", "Ünïcödé, punctuation... and numbers 1234567890", "")


def configured_names(config: EncodeConfig) -> dict[str, dict[str, Any]]:
    """The identity records' name fields alone, known without loading anything."""
    return {
        "vae": {"id": config.vae, "subfolder": config.vae_subfolder},
        "text_encoder": {"id": config.text_encoder, "subfolder": config.text_encoder_subfolder},
        "tokenizer": {"id": config.tokenizer, "subfolder": config.tokenizer_subfolder},
    }


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 over the vocabulary, the ids of a few probe texts and the max length."""
    payload = {
        "vocab": tokenizer.get_vocab(),
        "probes": [tokenizer(text).input_ids for text in _PROBES],
        "max_length": tokenizer.model_max_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def describe(record: dict[str, Any]) -> str:
    subfolder = f" (subfolder {record['subfolder']!r})" if record.get("subfolder") else ""
    return f"{record.get('id')!r}{subfolder} with weights_sha256 {record.get('weights_sha256')}"


def check_manifest(manifest: dict[str, Any], configured: dict[str, dict[str, Any]], where: str) -> None:
    """Raise `EncoderMismatchError` unless the manifest's VAE and text encoder are `configured`'s.

    `configured` holds records as `Encoders.records` makes them; `where` names the manifest in
    the message (its path or URL).
    """
    problems = []
    for kind in KINDS:
        recorded, wanted = manifest.get(kind) or {}, configured[kind]
        if not recorded.get("weights_sha256"):
            problems.append(f"{kind}: the manifest records no weights_sha256, so the latents' {kind} is unknown")
        elif recorded["weights_sha256"] != wanted["weights_sha256"]:
            problems.append(f"{kind}: the latents were made by {describe(recorded)}, but the config names {describe(wanted)}")
    recorded_vocab = (manifest.get("tokenizer") or {}).get("vocab_sha256")
    wanted_vocab = (configured.get("tokenizer") or {}).get("vocab_sha256")
    if recorded_vocab and wanted_vocab and recorded_vocab != wanted_vocab:
        problems.append(
            f"tokenizer: the latents' captions were tokenized by {manifest['tokenizer'].get('id')!r} (vocab_sha256 "
            f"{recorded_vocab}), but the config names {configured['tokenizer'].get('id')!r} (vocab_sha256 {wanted_vocab})"
        )
    recorded_factor = (manifest.get("vae") or {}).get("scaling_factor")
    wanted_factor = configured["vae"].get("scaling_factor")
    if not problems and recorded_factor is not None and wanted_factor is not None and abs(recorded_factor - wanted_factor) > 1e-9:
        problems.append(f"vae: scaling_factor {recorded_factor} in the manifest, {wanted_factor} in the configured VAE's config")
    if problems:
        raise EncoderMismatchError(
            f"the latent shards described by {where} do not match the configured encoders (encode.* in the config):\n  "
            + "\n  ".join(problems)
            + "\nRe-encode with these encoders (pipeline encode RUN --force) or configure the ones that made the latents."
        )


def check_run_encoders(config: EncodeConfig, manifest: dict[str, Any], where: str = layout.ENCODE_MANIFEST) -> Encoders:
    """Load the configured encoders, check them against the manifest, and return them."""
    encoders = Encoders.load(config)
    check_manifest(manifest, encoders.records(config), where)
    return encoders
