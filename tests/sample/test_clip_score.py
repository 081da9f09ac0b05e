"""CLIP score with a tiny random CLIPModel saved by save_pretrained, and the metrics' skip notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sample_support import CLIP_IMAGE_SIZE as SIDE
from sample_support import PROMPTS, sample_config
from transformers import CLIPModel

from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir
from sample.clip_score import ClipScorer, has_image_tower
from sample.metrics import Metrics

MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def test_clip_score_is_the_mean_clamped_cosine_times_100(clip_dir):
    scorer = ClipScorer(str(clip_dir))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 40, 3)).astype(np.uint8)
    texts = [PROMPTS[0], PROMPTS[1], "a photo of a cat"]
    score = scorer.score(images, texts)
    assert 0 <= score <= 100
    assert scorer.score(images, texts) == score  # deterministic

    # The same by hand: shorter side to 32 (bicubic), centre crop, CLIP's mean and std, projected and normalised.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = []
    for image in images:
        resized = Image.fromarray(image).resize((SIDE, round(48 * SIDE / 40)), Image.BICUBIC)
        top = (resized.height - SIDE) // 2
        array = np.asarray(resized.crop((0, top, SIDE, top + SIDE))) / 255.0
        pixels.append(((array - MEAN) / STD).transpose(2, 0, 1))
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=torch.tensor(np.stack(pixels), dtype=torch.float32))
        tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
        text_out = model.get_text_features(**tokens)
    image_emb = getattr(image_out, "pooler_output", image_out)
    text_emb = getattr(text_out, "pooler_output", text_out)
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    assert score == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), abs=0.05)


def test_clip_score_clamps_negative_cosines(clip_dir, monkeypatch):
    scorer = ClipScorer(str(clip_dir))
    unit = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    monkeypatch.setattr(scorer, "image_embeddings", lambda images: unit)
    monkeypatch.setattr(scorer, "text_embeddings", lambda texts: torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
    # cosines 1, 0.6, -1 -> 100 * mean(1, 0.6, 0)
    assert scorer.score(np.zeros((3, 4, 4, 3), np.uint8), ["a", "b", "c"]) == pytest.approx(100 * 1.6 / 3)


def test_metrics_use_a_whole_clip_model_and_note_what_they_skip(clip_dir, model_dirs, tmp_path):
    run = RunDir(tmp_path / "run")
    assert has_image_tower(str(clip_dir)) and not has_image_tower(str(model_dirs["text_encoder"]))

    # The text encoder is text-only and nothing else is configured: both metrics skipped, with reasons.
    metrics = Metrics.load(sample_config(model_dirs), run, torch.device("cpu"))
    assert metrics.clip is None and metrics.fid is None
    assert "has no image tower" in metrics.skipped["clip_score"] and "sample.clip_model" in metrics.skipped["clip_score"]
    assert "sample.fid_inception" in metrics.skipped["fid"]
    images = np.zeros((2, 2, 16, 16, 3), np.uint8)
    assert metrics.measure(images, PROMPTS) == {}

    config = sample_config(model_dirs, clip_model=str(clip_dir), fid_inception=str(tmp_path / "missing.pth"))
    metrics = Metrics.load(config, run, torch.device("cpu"))
    assert set(metrics.skipped) == {"fid"} and "does not exist" in metrics.skipped["fid"]
    measured = metrics.measure(images, PROMPTS)
    assert set(measured) == {"clip_score"} and 0 <= measured["clip_score"] <= 100

    # A text encoder that is a whole CLIPModel (e.g. openai/clip-vit-large-patch14) serves by itself.
    config = sample_config({**model_dirs, "text_encoder": clip_dir})
    assert Metrics.load(config, run, torch.device("cpu")).clip is not None

    config = sample_config(model_dirs, clip_model=str(tmp_path / "nowhere"), judge="none")
    config.ingest = IngestConfig(source="urls", url_list="x.parquet")
    config.sample.fid_inception = str(clip_dir / "config.json")  # exists; no reference set for a URL source
    metrics = Metrics.load(config, run, torch.device("cpu"))
    assert "could not be loaded" in metrics.skipped["clip_score"]
    assert "sample.fid_reference" in metrics.skipped["fid"]
