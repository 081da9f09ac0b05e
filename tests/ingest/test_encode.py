"""The encode stage: pure core without Ray, then the Ray Data stage on real img2dataset shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ingest import encode
from ingest.models import encode_prompts, load_text_encoder, load_tokenizer, load_vae, vae_scaling_factor
from pipeline import layout
from pipeline.arrays import from_base64_npy, from_npy_bytes
from pipeline.config import load_config
from pipeline.rundir import RunDir


def test_center_crop_takes_the_middle_square():
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 90, 60))  # blue middle band
    out = encode.center_crop(image, 32)
    assert out.shape == (32, 32, 3)
    assert (out[:, 2:-2] == [0, 0, 255]).all()


def test_preprocess_marks_undecodable_images_invalid():
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    batch = {
        "__key__": np.array(["a", "b", "c"]),
        "jpg": [good.getvalue(), b"not an image", good.getvalue()[:100]],
        "txt": [b"x", "y", b"z"],
        "json": [b"{}", b"{}", b"{}"],
    }
    out = encode.preprocess(batch, resolution=32)
    assert out["valid"].tolist() == [True, False, False]
    assert out["pixels"].shape == (3, 32, 32, 3)
    assert out["txt"].tolist() == ["x", "y", "z"]


def test_encode_batch_shapes_and_scaling():
    vae = load_vae("builtin:tiny-vae")
    tokenizer, text_encoder = load_tokenizer("builtin:clip-tokenizer"), load_text_encoder("builtin:tiny-text-encoder")
    pixels = torch.zeros(2, 3, 64, 64)
    latents, text = encode.encode_batch(pixels, ["a red circle on a blue background", ""], vae, tokenizer, text_encoder, 2.0)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == np.float16
    assert text.shape == (2, 77, 64) and text.dtype == np.float16
    unscaled = vae.encode(pixels).latent_dist.mode().numpy()
    np.testing.assert_allclose(latents.astype(np.float32), 2.0 * unscaled, rtol=1e-2, atol=1e-2)
    empty = encode_prompts(tokenizer, text_encoder, [""])[0].numpy()
    np.testing.assert_allclose(text[1].astype(np.float32), empty, atol=1e-2)


def test_encode_stage_on_real_shards(tmp_path, ray_local):
    from ingest.stage import run_stage as ingest

    config = load_config("tiny", overrides=["ingest.toy_count=150", "ingest.samples_per_shard=50", "encode.batch_size=32"])
    run = RunDir(tmp_path)
    ingest(config, run)
    summary = encode.run_stage(config, run)

    manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert manifest["samples"] == 150 and summary["counts"]["samples"] == 150
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_embedding_shape"] == [77, 64]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(vae_scaling_factor(load_vae("builtin:tiny-vae")))
    assert len(manifest["vae"]["weights_sha256"]) == 64
    empty = from_base64_npy(manifest["empty_caption_embedding"])
    assert empty.shape == (77, 64) and empty.dtype == np.float16

    keys, captions = set(), []
    for shard in run.list(layout.ENCODE_SHARDS, suffix=".tar"):
        with tarfile.open(tmp_path / layout.ENCODE_SHARDS / shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                data = archive.extractfile(member).read()
                if ext == layout.LATENT_KEY:
                    assert from_npy_bytes(data).shape == (4, 8, 8)
                    keys.add(key)
                elif ext == layout.TEXT_EMBEDDING_KEY:
                    assert from_npy_bytes(data).shape == (77, 64)
                elif ext == layout.META_KEY:
                    captions.append(json.loads(data)["caption"])
    assert len(keys) == 150 and len(captions) == 150  # every sample exactly once
    assert all(caption.endswith("background") for caption in captions)
