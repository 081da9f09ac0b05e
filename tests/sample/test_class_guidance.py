"""Class-conditional guidance: the conditional half gets the image's class, the unconditional half the
null class; and which rows validation samples for each train.conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sample_support import LATENT_SHAPE, TEXT_DIM, tiny_unet, training_scheduler

from pipeline.core.config import load_config
from sample.conditions import validation_conditions
from sample.guidance import ConditionRows, make_scheduler, predict_with_guidance, sample_latents

NULL = 3


class ClassStub(torch.nn.Module):
    """Predicts 0.1 * x + label: linear in the class label, so guidance on labels is checkable."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.labels: list[list[int]] = []

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, t, encoder_hidden_states, class_labels):
        self.labels.append(class_labels.tolist())
        return SimpleNamespace(sample=0.1 * x + class_labels.float().view(-1, 1, 1, 1))


def test_guidance_pairs_the_class_with_the_null_class():
    unet = ClassStub()
    x, empty = torch.randn(2, *LATENT_SHAPE), torch.zeros(2, 77, TEXT_DIM)
    cond, uncond = torch.tensor([0, 2]), torch.full((2,), NULL)
    for scale in (0.0, 1.0, 7.5):
        got = predict_with_guidance(unet, x, torch.tensor(500), empty, empty, scale, cond, uncond)
        expected = 0.1 * x + (uncond + scale * (cond - uncond)).float().view(-1, 1, 1, 1)
        torch.testing.assert_close(got, expected)
    assert unet.labels == [[NULL, NULL], [0, 2], [NULL, NULL, 0, 2]]


def test_sample_latents_sends_the_null_class_unconditionally():
    unet = ClassStub()
    scheduler = make_scheduler("ddim", training_scheduler().config)
    empty = torch.zeros(77, TEXT_DIM)
    rows = ConditionRows(empty.expand(2, 77, TEXT_DIM), empty, [1, 2], NULL)
    sample_latents(unet, scheduler, rows, 3.0, [0, 1], 2, LATENT_SHAPE)
    assert unet.labels == [[NULL, NULL, 1, 2]] * 2
    with pytest.raises(ValueError, match="needs null_class"):
        ConditionRows(empty.expand(2, 77, TEXT_DIM), empty, [1, 2])
    with pytest.raises(ValueError, match="one label per row"):
        ConditionRows(empty.expand(2, 77, TEXT_DIM), empty, [1], NULL)


def test_a_real_class_unet_depends_on_its_label():
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.register_to_config(num_class_embeds=NULL + 1)
    unet.class_embedding = torch.nn.Embedding(NULL + 1, unet.time_embedding.linear_2.out_features)
    scheduler = make_scheduler("ddim", training_scheduler().config)
    empty = torch.zeros(77, TEXT_DIM)

    def run(labels, scale):
        rows = ConditionRows(empty.expand(2, 77, TEXT_DIM), empty, labels, NULL)
        return sample_latents(unet, scheduler, rows, scale, [5, 5], 2, LATENT_SHAPE)

    torch.testing.assert_close(run([0, 1], 0.0)[0], run([0, 1], 0.0)[1])  # s = 0: the null class for both
    assert not torch.allclose(run([0, 1], 3.0)[0], run([0, 1], 3.0)[1])


MANIFEST = {"classes": ["circle", "square", "triangle"], "class_field": "shape"}


def test_class_mode_validates_every_class_with_the_empty_caption():
    config = load_config("tiny", overrides=["train.conditioning=class", "encode.class_field=shape"])
    conditions = validation_conditions(config, MANIFEST)
    assert conditions.texts == ["circle", "square", "triangle"] and conditions.prompts == [None] * 3
    assert conditions.labels == [0, 1, 2] and conditions.null_class == 3
    assert conditions.shape_targets() == ["circle", "square", "triangle"]
    picked = load_config(
        "tiny", overrides=["train.conditioning=class", "encode.class_field=shape", 'sample.class_labels=["triangle"]']
    )
    assert validation_conditions(picked, MANIFEST).labels == [2]
    wrong = load_config(
        "tiny", overrides=["train.conditioning=class", "encode.class_field=shape", 'sample.class_labels=["star"]']
    )
    with pytest.raises(ValueError, match=r"sample.class_labels \['star'\] are not classes of this run"):
        validation_conditions(wrong, MANIFEST)


def test_text_and_class_mode_pairs_every_prompt_with_every_class():
    config = load_config(
        "tiny",
        overrides=[
            "train.conditioning=text+class",
            "encode.class_field=shape",
            'sample.prompts=["a red circle on a blue background"]',
            'sample.class_labels=["square", "circle"]',
        ],
    )
    conditions = validation_conditions(config, MANIFEST)
    assert conditions.texts == ["a red circle on a blue background [square]", "a red circle on a blue background [circle]"]
    assert conditions.labels == [1, 0] and conditions.shape_targets() == ["square", "circle"]


def test_text_mode_judges_the_prompts_shape():
    conditions = validation_conditions(load_config("tiny"), {})
    assert conditions.labels is None and conditions.shape_targets()[:3] == ["circle", "square", "triangle"]
