"""The shipped tiny models and their loaders (pipeline.core.models); all offline and fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import models
from pipeline.core.toy import generate
from sample.judge import is_correct

PUPPY_IDS = [49406, 320, 8853, 539, 320, 6829, 49407] + [49407] * 70


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("builtin:clip-tokenizer")


@pytest.fixture(scope="module")
def text_encoder():
    return models.load_text_encoder("builtin:tiny-text-encoder")


@pytest.fixture(scope="module")
def vae():
    return models.load_vae("builtin:tiny-vae")


def test_tokenizer_gives_openai_clip_ids(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("A photograph of a puppy", padding="max_length", max_length=77).input_ids
    assert ids == PUPPY_IDS


@pytest.mark.parametrize(
    ("name", "folder"),
    [("builtin:tiny-vae", "vae"), ("builtin:tiny-text-encoder", "text_encoder"), ("builtin:clip-tokenizer", "tokenizer")],
)
def test_builtin_names_resolve_to_shipped_folders(name, folder):
    path = Path(models.resolve_model_path(name))
    assert path == models.ASSETS_DIR / folder
    assert path.is_dir()
    assert models.resolve_model_path(f"builtin:{folder}") == str(path)


def test_other_names_pass_through():
    assert models.resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert models.resolve_model_path("/some/local/dir") == "/some/local/dir"
    with pytest.raises(ValueError, match="unknown builtin"):
        models.resolve_model_path("builtin:no-such-model")


def test_loaded_models_are_frozen_and_in_requested_dtype(vae, text_encoder):
    for model in (vae, text_encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert text_encoder.config.hidden_size == 64
    assert text_encoder.config.vocab_size == 49408
    half = models.load_text_encoder("builtin:tiny-text-encoder", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_subfolder_loading_like_an_sd_repository(tmp_path, vae, text_encoder, tokenizer):
    vae.save_pretrained(tmp_path / "vae")
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert models.weights_sha256(models.load_vae(str(tmp_path), subfolder="vae")) == models.weights_sha256(vae)
    reloaded = models.load_text_encoder(str(tmp_path), subfolder="text_encoder")
    assert models.weights_sha256(reloaded) == models.weights_sha256(text_encoder)
    reloaded_tok = models.load_tokenizer(str(tmp_path), subfolder="tokenizer")
    assert reloaded_tok("A photograph of a puppy", padding="max_length", max_length=77).input_ids == PUPPY_IDS


def test_weights_sha256_is_stable_across_save_and_load(tmp_path, vae):
    digest = models.weights_sha256(vae)
    assert len(digest) == 64
    assert digest == models.weights_sha256(vae)
    vae.save_pretrained(tmp_path, safe_serialization=True)
    assert models.weights_sha256(models.load_vae(str(tmp_path))) == digest
    changed = models.load_vae(str(tmp_path))
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert models.weights_sha256(changed) != digest


def test_vae_scaling_factor(vae):
    factor = models.vae_scaling_factor(vae)
    assert isinstance(factor, float)
    assert 0.05 < factor < 5.0
    assert factor != 0.18215  # set from the latent statistics, not the SD default


def test_shipped_vae_reconstructs_toy_images(vae):
    pairs = generate(64, 64, seed=7)  # training used seeds >= 10_000_000, held-out 20_000
    pixels = np.stack([np.asarray(image) for _, image in pairs])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode()
        recon = vae.decode(latents).sample
    assert latents.shape == (64, 4, 8, 8)
    out = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    accuracy = np.mean([is_correct(img, spec) for img, (spec, _) in zip(out, pairs)])
    assert accuracy >= 0.95


def test_encode_prompts_shape_and_fixed_empty_embedding(tokenizer, text_encoder):
    embeddings = models.encode_prompts(tokenizer, text_encoder, ["a red circle on a blue background", ""])
    assert embeddings.shape == (2, 77, 64)
    assert embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1])
    empty_again = models.encode_prompts(tokenizer, text_encoder, [""])
    torch.testing.assert_close(empty_again[0], embeddings[1], rtol=0, atol=1e-5)


def test_encode_prompts_truncates_long_prompts(tokenizer, text_encoder):
    embeddings = models.encode_prompts(tokenizer, text_encoder, ["red " * 200])
    assert embeddings.shape == (1, 77, 64)
