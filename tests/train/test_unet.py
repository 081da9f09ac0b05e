"""UNet presets (train.unet)."""

from __future__ import annotations

import torch

from train.unet import build_unet, parameter_count


def test_sd15_preset_has_the_sd15_parameter_count_on_the_meta_device():
    unet = build_unet("sd15", cross_attention_dim=768, sample_size=32, on_meta=True)
    assert next(unet.parameters()).device.type == "meta"
    assert abs(parameter_count(unet) - 859.52e6) < 0.1e6


def test_tiny_preset_predicts_a_latent_shaped_output():
    unet = build_unet("tiny", cross_attention_dim=64, sample_size=8)
    assert 4.0e6 < parameter_count(unet) < 4.5e6
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), encoder_hidden_states=torch.randn(2, 77, 64)).sample
    assert out.shape == (2, 4, 8, 8)


def test_unknown_preset_is_named():
    import pytest

    with pytest.raises(ValueError, match="'huge'"):
        build_unet("huge", cross_attention_dim=64, sample_size=8)
