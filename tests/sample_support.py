"""Tiny randomly initialised models and a synthetic run directory for the sample-stage tests.

The models are saved with `save_pretrained` and loaded back through `pipeline.core.models` by local
path, the same code path real models and the shipped `builtin:` ones take.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from pipeline.core import layout, models
from pipeline.core.arrays import to_base64_npy
from pipeline.core.config import EncodeConfig, PipelineConfig, SampleConfig
from pipeline.core.rundir import RunDir

RESOLUTION = 16  # pixels; the tiny VAE halves it once -> 8x8 latents
LATENT_SHAPE = [4, 8, 8]
TEXT_DIM = 32
PROMPTS = ["a red circle on a green background", "a blue square on a yellow background"]


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=0.5,
    )


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SHAPE[1],
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny VAE and text encoder saved with save_pretrained, plus the shipped tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    tiny_vae().save_pretrained(root / "vae")
    tiny_text_encoder().save_pretrained(root / "text_encoder")
    return {"vae": root / "vae", "text_encoder": root / "text_encoder", "tokenizer": "builtin:clip-tokenizer"}


def export_step(run: RunDir, step: int, scratch: Path, seed: int | None = None) -> None:
    """What the train stage leaves: train/export/step-N/{unet,scheduler} and its commit marker."""
    local = scratch / f"export-{step}"
    if local.exists():
        shutil.rmtree(local)
    tiny_unet(step if seed is None else seed).save_pretrained(local / "unet")
    training_scheduler().save_pretrained(local / "scheduler")
    run.put_dir(local, f"{layout.TRAIN_EXPORT}/{layout.step_name(step)}")


def encode_manifest(vae_id: str, text_encoder_id: str, tokenizer_id: str) -> dict:
    """The encode stage's manifest for these models (hashes and empty caption computed here)."""
    vae = models.load_vae(vae_id)
    text_encoder = models.load_text_encoder(text_encoder_id)
    tokenizer = models.load_tokenizer(tokenizer_id)
    empty = models.encode_prompts(tokenizer, text_encoder, [""])[0].float().numpy()
    channels = vae.config.latent_channels
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "vae": {
            "id": vae_id,
            "subfolder": None,
            "weights_sha256": models.weights_sha256(vae),
            "scaling_factor": models.vae_scaling_factor(vae),
        },
        "text_encoder": {"id": text_encoder_id, "subfolder": None, "weights_sha256": models.weights_sha256(text_encoder)},
        "tokenizer": {"id": tokenizer_id, "subfolder": None},
        "resolution": vae.config.sample_size,
        "latent_shape": [channels, side, side],
        "text_embedding_shape": list(empty.shape),
        "empty_caption_embedding": to_base64_npy(empty),
    }


def sample_config(encoders: dict | None = None, **overrides) -> PipelineConfig:
    """Sampling settings for the tests; `encoders` (like `model_dirs`) names the encode models
    sampling must load (they must have made the run's latents), else the builtin ones."""
    settings = {
        "prompts": PROMPTS,
        "seeds": [0, 1],
        "guidance_scales": [0.0, 1.0, 7.5],
        "scheduler": "ddim",
        "steps": 2,
        "batch_size": 3,
        "judge": "toy",
    }
    settings.update(overrides)
    encode = EncodeConfig(**{kind: str(name) for kind, name in (encoders or {}).items()})
    return PipelineConfig(encode=encode, sample=SampleConfig(**settings))


@pytest.fixture
def synthetic_run(tmp_path, model_dirs) -> RunDir:
    """A run directory with an encode manifest and two committed exports (steps 10 and 20)."""
    run = RunDir(tmp_path / "run")
    run.write_json(
        layout.ENCODE_MANIFEST, encode_manifest(str(model_dirs["vae"]), str(model_dirs["text_encoder"]), model_dirs["tokenizer"])
    )
    for step in (10, 20):
        export_step(run, step, tmp_path)
    return run


CLIP_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random whole CLIPModel (text and image towers) with the shipped tokenizer, saved with save_pretrained."""
    torch.manual_seed(0)
    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": CLIP_IMAGE_SIZE,
        "patch_size": 8,
    }
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    models.load_tokenizer("builtin:clip-tokenizer").save_pretrained(folder)
    return folder
