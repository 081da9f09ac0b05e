"""Which encoders made the latents, and refusing the ones that did not (pipeline.core.identity)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import models
from pipeline.core.config import EncodeConfig
from pipeline.core.identity import EncoderMismatchError, Encoders, check_manifest, check_run_encoders

VAE_HASH, OTHER_VAE_HASH, TEXT_HASH = "a" * 64, "b" * 64, "c" * 64
WHERE = "s3://bucket/run/encode/manifest.json"


def records(vae_id: str = "builtin:tiny-vae", vae_hash: str = VAE_HASH, scaling_factor: float = 0.18215) -> dict:
    """Identity records as `Encoders.records` makes them (and the manifest stores them)."""
    return {
        "vae": {"id": vae_id, "subfolder": None, "weights_sha256": vae_hash, "scaling_factor": scaling_factor},
        "text_encoder": {"id": "builtin:tiny-text-encoder", "subfolder": None, "weights_sha256": TEXT_HASH},
        "tokenizer": {"id": "builtin:clip-tokenizer", "subfolder": None, "max_length": 77},
    }


def mismatch(manifest: dict, configured: dict) -> str:
    with pytest.raises(EncoderMismatchError) as error:
        check_manifest(manifest, configured, WHERE)
    return str(error.value)


def test_matching_encoders_pass():
    check_manifest({**records(), "latent_shape": [4, 8, 8]}, records(), WHERE)


def test_other_vae_weights_are_refused_naming_both_sides():
    message = mismatch(records("stabilityai/sd-vae-ft-mse", OTHER_VAE_HASH), records("/models/my-vae", VAE_HASH))
    for expected in ("stabilityai/sd-vae-ft-mse", OTHER_VAE_HASH, "/models/my-vae", VAE_HASH, WHERE):
        assert expected in message
    assert "text_encoder" not in message


def test_other_text_encoder_weights_are_refused():
    manifest = records()
    manifest["text_encoder"]["weights_sha256"] = "d" * 64
    message = mismatch(manifest, records())
    assert "text_encoder" in message and "d" * 64 in message and TEXT_HASH in message


def test_the_same_weights_under_another_id_or_subfolder_are_accepted():
    manifest = records("runwayml/stable-diffusion-v1-5")
    manifest["vae"]["subfolder"] = "vae"
    check_manifest(manifest, records("/mnt/models/vae-copy"), WHERE)


@pytest.mark.parametrize("damage", ["no hash", "no record"])
def test_a_manifest_without_a_weights_hash_is_refused(damage):
    manifest = records()
    if damage == "no hash":
        del manifest["vae"]["weights_sha256"]
    else:
        del manifest["vae"]
    message = mismatch(manifest, records())
    assert "vae: the manifest records no weights_sha256" in message


def test_another_scaling_factor_is_refused():
    message = mismatch(records(scaling_factor=0.13025), records(scaling_factor=0.18215))
    assert "scaling_factor 0.13025 in the manifest, 0.18215" in message


def test_check_run_encoders_loads_the_configured_models_and_compares_their_weights(tmp_path):
    builtin = EncodeConfig()
    manifest = Encoders.load(builtin).records(builtin)

    vae = models.load_vae("builtin:tiny-vae")
    vae.save_pretrained(tmp_path / "same-vae")
    same = EncodeConfig(vae=str(tmp_path / "same-vae"))
    encoders = check_run_encoders(same, manifest, WHERE)
    assert encoders.tokenizer.model_max_length == 77
    assert models.weights_sha256(encoders.vae) == manifest["vae"]["weights_sha256"]

    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.01
    vae.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(EncoderMismatchError) as error:
        check_run_encoders(EncodeConfig(vae=str(tmp_path / "other-vae")), manifest, WHERE)
    message = str(error.value)
    for expected in (
        "builtin:tiny-vae",
        manifest["vae"]["weights_sha256"],
        str(tmp_path / "other-vae"),
        models.weights_sha256(vae),
    ):
        assert expected in message


def test_another_tokenizer_is_refused_and_a_saved_copy_accepted(tmp_path):
    config = EncodeConfig()
    encoders = Encoders.load(config)
    manifest = encoders.records(config)
    encoders.tokenizer.save_pretrained(tmp_path / "same")
    copy = EncodeConfig(tokenizer=str(tmp_path / "same"))
    check_manifest(manifest, Encoders.load(copy).records(copy), WHERE)

    encoders.tokenizer.add_tokens(["<shiny-new-token>"])
    encoders.tokenizer.save_pretrained(tmp_path / "other")
    other = EncodeConfig(tokenizer=str(tmp_path / "other"))
    message = mismatch(manifest, Encoders.load(other).records(other))
    assert "tokenizer" in message and str(tmp_path / "other") in message and "builtin:clip-tokenizer" in message
