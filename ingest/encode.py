"""Encode: raw webdataset shards -> latent shards (VAE latents + CLIP text embeddings).

Ray Data reads the raw shards, CPU tasks decode and crop the images, an actor pool whose
actors each hold the VAE and text encoder once encodes them, and the result is written as
webdataset shards. `encode/manifest.json` records which models made the latents and the
empty-caption embedding that training uses for caption dropout.
"""

from __future__ import annotations

import io
import math
import json
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from ingest.distribute import complete_shards
from pipeline import layout
from pipeline.arrays import to_base64_npy, to_npy_bytes
from pipeline.config import EncodeConfig, PipelineConfig
from pipeline.rundir import RunDir

PIXELS = "pixels"
VALID = "valid"
KEY = "__key__"


# Pure core ---------------------------------------------------------------------------------
def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution`, crop the centre square: HxWx3 uint8."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """BxHxWx3 uint8 -> Bx3xHxW float in [-1, 1], as SD's VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_batch(pixels: torch.Tensor, captions: list[str], vae, tokenizer, text_encoder, scaling_factor: float):
    """Pixels in [-1, 1] and captions -> (scaled latent means, text embeddings) as float16 numpy."""
    from ingest.models import encode_prompts

    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode() * scaling_factor
    text = encode_prompts(tokenizer, text_encoder, captions)
    return latents.float().cpu().numpy().astype(np.float16), text.float().cpu().numpy().astype(np.float16)


# Ray Data stages ---------------------------------------------------------------------------
def preprocess(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Decode and crop on CPU tasks; undecodable images are marked invalid, not fatal."""
    count = len(batch[KEY])
    pixels = np.zeros((count, resolution, resolution, 3), dtype=np.uint8)
    valid = np.zeros(count, dtype=bool)
    for index, data in enumerate(batch[layout.IMAGE_KEY]):
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels[index] = center_crop(image, resolution)
            valid[index] = True
        except Exception:  # noqa: BLE001 - any decode error means "skip and count"
            pass
    captions = np.array([_text(caption) for caption in batch[layout.CAPTION_KEY]], dtype=object)
    return {KEY: batch[KEY], layout.CAPTION_KEY: captions, layout.META_KEY: batch[layout.META_KEY], PIXELS: pixels, VALID: valid}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class Encoder:
    """An actor holding the VAE and text encoder once; one call encodes one batch."""

    def __init__(self, settings: dict[str, Any]):
        from ingest.models import load_text_encoder, load_tokenizer, load_vae, vae_scaling_factor

        config = EncodeConfig.model_validate(settings)
        torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        self.device = torch.device("cuda" if config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.precision)
        self.vae = load_vae(config.vae, subfolder=config.vae_subfolder).to(self.device)
        self.text_encoder = load_text_encoder(config.text_encoder, subfolder=config.text_encoder_subfolder).to(self.device)
        self.tokenizer = load_tokenizer(config.tokenizer, subfolder=config.tokenizer_subfolder)
        self.scaling_factor = vae_scaling_factor(self.vae)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keep = np.flatnonzero(batch[VALID])
        pixels = to_model_input(batch[PIXELS][keep])
        captions = [str(batch[layout.CAPTION_KEY][i]) for i in keep]
        use_autocast = self.autocast is not None and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=use_autocast):
            latents, text = encode_batch(pixels, captions, self.vae, self.tokenizer, self.text_encoder, self.scaling_factor)
        return {
            KEY: [batch[KEY][i] for i in keep],
            layout.LATENT_KEY: [to_npy_bytes(latent) for latent in latents],
            layout.TEXT_EMBEDDING_KEY: [to_npy_bytes(embedding) for embedding in text],
            layout.META_KEY: [_meta_bytes(batch[layout.META_KEY][i], captions[j]) for j, i in enumerate(keep)],
        }


def _meta_bytes(raw: Any, caption: str) -> bytes:
    try:
        meta = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
    except (ValueError, TypeError):
        meta = {}
    meta["caption"] = caption
    return json.dumps(meta).encode("utf-8")


def _counting_webdataset_sink(path: str, min_rows_per_file: int):
    """Ray's webdataset sink, remembering how many rows it wrote (reported on the driver)."""
    from ray.data._internal.datasource.webdataset_datasink import WebDatasetDatasink

    class CountingSink(WebDatasetDatasink):
        rows_written = 0

        def on_write_complete(self, write_result):
            super().on_write_complete(write_result)
            CountingSink.rows_written = int(write_result.num_rows)

    return CountingSink(path, encoder=None, min_rows_per_file=min_rows_per_file)


# Stage -------------------------------------------------------------------------------------
def build_manifest(config: EncodeConfig) -> dict[str, Any]:
    """Model identities, shapes and the empty-caption embedding, computed once on the driver."""
    from ingest.models import encode_prompts, load_text_encoder, load_tokenizer, load_vae, vae_scaling_factor, weights_sha256

    vae = load_vae(config.vae, subfolder=config.vae_subfolder)
    text_encoder = load_text_encoder(config.text_encoder, subfolder=config.text_encoder_subfolder)
    tokenizer = load_tokenizer(config.tokenizer, subfolder=config.tokenizer_subfolder)
    empty = encode_prompts(tokenizer, text_encoder, [""])[0].float().numpy().astype(np.float16)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = [vae.config.latent_channels, config.resolution // downsample, config.resolution // downsample]
    return {
        "vae": {"id": config.vae, "subfolder": config.vae_subfolder, "weights_sha256": weights_sha256(vae), "scaling_factor": vae_scaling_factor(vae)},
        "text_encoder": {"id": config.text_encoder, "subfolder": config.text_encoder_subfolder, "weights_sha256": weights_sha256(text_encoder)},
        "tokenizer": {"id": config.tokenizer, "subfolder": config.tokenizer_subfolder, "max_length": tokenizer.model_max_length},
        "resolution": config.resolution,
        "latent": "mode of the VAE posterior times scaling_factor",
        "latent_shape": latent_shape,
        "text_embedding_shape": list(empty.shape),
        "dtype": "float16",
        "bytes_per_sample": 2 * (math.prod(latent_shape) + math.prod(empty.shape)),
        "empty_caption_embedding": to_base64_npy(empty),
    }


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    import ray

    settings = config.encode
    started = time.monotonic()
    raw_shards = [run.path(f"{layout.INGEST_SHARDS}/{name}") for name in complete_shards(run)]
    if not raw_shards:
        raise FileNotFoundError(f"no raw shards under {run.path(layout.INGEST_SHARDS)}: run the ingest stage first")
    manifest = build_manifest(settings)
    run.remove(layout.ENCODE_SHARDS)  # a previous, interrupted attempt may have left part of its output

    dataset = (
        # decoder=None: members stay bytes and nothing is ever unpickled from a shard.
        ray.data.read_webdataset(raw_shards, decoder=None, suffixes=[layout.IMAGE_KEY, layout.CAPTION_KEY, layout.META_KEY])
        .map_batches(preprocess, fn_kwargs={"resolution": settings.resolution}, batch_size=settings.batch_size, num_cpus=0.25)
        .map_batches(
            Encoder,
            fn_constructor_kwargs={"settings": settings.model_dump()},
            compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
            batch_size=settings.batch_size,
            num_cpus=settings.cpus_per_actor,
            num_gpus=settings.gpus_per_actor,
        )
    )
    sink = _counting_webdataset_sink(run.path(layout.ENCODE_SHARDS), config.ingest.samples_per_shard)
    dataset.write_datasink(sink)
    written = type(sink).rows_written

    ingested = run.read_json(layout.INGEST_STATS, default={}).get("succeeded", written)
    shards = run.list(layout.ENCODE_SHARDS, suffix=".tar")
    seconds = time.monotonic() - started
    manifest.update(
        samples=written,
        skipped_undecodable=max(0, ingested - written),
        shards=shards,
        seconds=round(seconds, 2),
        samples_per_s=round(written / max(seconds, 1e-9), 2),
    )
    run.write_json(layout.ENCODE_MANIFEST, manifest)
    if written == 0:
        raise RuntimeError("encode wrote no sample: every image failed to decode")
    return {"counts": {"samples": written, "skipped": manifest["skipped_undecodable"], "shards": len(shards)}, "outputs": [layout.ENCODE_SHARDS, layout.ENCODE_MANIFEST]}
