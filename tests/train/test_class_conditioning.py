"""Class-conditional training: the null class drops with the caption in the real `train_step`, the UNet
gets a class embedding for every class plus the null one, and an init model must have as many."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.config import load_config
from train import distributed, finetune
from train.step import PlainEngine, loss_options, make_noise_scheduler, train_step
from train.unet import build_unet, class_embedding_count

BATCH, BATCHES, TEXT_SHAPE, CLASSES = 16, 300, (77, 8), 3
CLASS_OVERRIDES = ["train.conditioning=class", "encode.class_field=shape"]


class Recorder(torch.nn.Module):
    """Takes a UNet's place: records the caption embeddings and class labels it is given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, noisy, timesteps, encoder_hidden_states, class_labels=None):
        self.seen.append((encoder_hidden_states.detach().clone(), class_labels))
        return SimpleNamespace(sample=noisy * self.scale)


def record_steps(conditioning: str, probability: float = 0.1):
    config = load_config(
        "tiny",
        overrides=[f"train.conditioning={conditioning}", "encode.class_field=shape", f"train.caption_dropout={probability}"],
    )
    recorder = Recorder()
    engine = PlainEngine(recorder, torch.optim.SGD(recorder.parameters(), lr=0.0))
    empty = torch.full(TEXT_SHAPE, 7.0)
    noise_scheduler = make_noise_scheduler(config.train)
    options = loss_options(config.train, CLASSES)
    for index in range(BATCHES):
        generator = torch.Generator().manual_seed(index)
        batch = {
            "latents": torch.zeros((BATCH, 4, 8, 8)),
            "text_embeddings": torch.randn((BATCH, *TEXT_SHAPE), generator=generator),
            "class_labels": torch.randint(0, CLASSES, (BATCH,), generator=generator),
        }
        train_step(
            engine,
            batch,
            noise_scheduler,
            empty,
            config.train.caption_dropout,
            distributed.batch_generator(config.seed, 0, 0, index),
            **options,
        )
    text = torch.stack([seen for seen, _ in recorder.seen])
    labels = torch.stack([labels for _, labels in recorder.seen])
    return (text == empty).all(dim=(2, 3)), labels


def test_text_and_class_drop_together_at_the_configured_rate():
    empty_caption, labels = record_steps("text+class")
    null = labels == CLASSES
    assert torch.equal(null, empty_caption)  # one draw: (empty caption, null class) together, never one alone
    trials, count = null.numel(), int(null.sum())
    assert abs(count - 0.1 * trials) <= 5 * math.sqrt(trials * 0.1 * 0.9)
    assert int(labels[~null].max()) < CLASSES  # kept labels are real classes


def test_class_mode_feeds_the_empty_caption_and_drops_only_the_label():
    empty_caption, labels = record_steps("class", probability=0.5)
    assert bool(empty_caption.all())  # the text input is always the empty caption's
    share = (labels == CLASSES).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.02)


def test_text_mode_passes_no_labels():
    config = load_config("tiny")
    assert "null_class" not in loss_options(config.train, CLASSES)
    with pytest.raises(ValueError, match="carry no class labels"):
        loss_options(load_config("tiny", overrides=CLASS_OVERRIDES).train, None)


def test_class_unet_trains_with_class_embeddings():
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=TEXT_SHAPE[1], sample_size=8, num_class_embeds=CLASSES + 1)
    assert unet.class_embedding.num_embeddings == CLASSES + 1
    config = load_config("tiny", overrides=CLASS_OVERRIDES)
    engine = PlainEngine(unet, torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0))
    before = unet.class_embedding.weight.detach().clone()
    batch = {
        "latents": torch.randn((4, 4, 8, 8)),
        "text_embeddings": torch.randn((4, *TEXT_SHAPE)),
        "class_labels": torch.tensor([0, 1, 2, 0]),
    }
    result = train_step(
        engine,
        batch,
        make_noise_scheduler(config.train),
        torch.zeros(TEXT_SHAPE),
        0.0,
        torch.Generator().manual_seed(0),
        **loss_options(config.train, CLASSES),
    )
    assert math.isfinite(result["loss"])
    changed = (unet.class_embedding.weight.detach() != before).any(dim=1)
    assert changed[:3].all() and not changed[3]  # the null class had no sample (dropout 0)


def test_class_embedding_count():
    assert class_embedding_count("text", ["a", "b"]) is None
    assert class_embedding_count("class", ["a", "b"]) == 3
    with pytest.raises(ValueError, match="lists no classes"):
        class_embedding_count("text+class", None)


def test_init_model_needs_the_same_class_count(tmp_path):
    config = load_config("tiny", overrides=[*CLASS_OVERRIDES, f"train.init_from={tmp_path}"]).train
    (tmp_path / "config.json").write_text(
        json.dumps({"in_channels": 4, "out_channels": 4, "cross_attention_dim": 8, "num_class_embeds": None})
    )
    init = finetune.InitModel(tmp_path, None)
    with pytest.raises(finetune.InitModelError, match=r"num_class_embeds = None .* needs 4 \(3 classes \+ the null class\)"):
        finetune.check_init(init, config, [4, 8, 8], [77, 8], class_embeds=4)
    (tmp_path / "config.json").write_text(
        json.dumps({"in_channels": 4, "out_channels": 4, "cross_attention_dim": 8, "num_class_embeds": 4})
    )
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    finetune.check_init(init, config, [4, 8, 8], [77, 8], class_embeds=4)
    text = load_config("tiny", overrides=[f"train.init_from={tmp_path}"]).train
    with pytest.raises(finetune.InitModelError, match="none \\(text conditioning\\)"):
        finetune.check_init(init, text, [4, 8, 8], [77, 8], class_embeds=None)
