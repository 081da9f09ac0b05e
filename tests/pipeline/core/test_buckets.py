"""Aspect-ratio buckets on the encode side: bucket sets and their validation, assignment, crop
geometry, the toy set's non-square images, and decode and encode of mixed shapes (no Ray)."""

import pytest

from pipeline.core import buckets
from pipeline.core.config import ConfigError, load_config, to_toml
from train.unet import PRESETS

KEEP_RATIO = "ingest.resize_mode='keep_ratio'"


def test_pixel_step_matches_the_unet_presets_depth():
    for name, preset in PRESETS.items():
        assert buckets.pixel_step(name) == 8 * 2 ** (len(preset["down_block_types"]) - 1)


@pytest.mark.parametrize("resolution, step", [(64, 16), (256, 64), (512, 64)])
def test_auto_buckets_keep_the_pixel_count_and_ratios_up_to_2_to_1(resolution, step):
    found = buckets.auto_buckets(resolution, step)
    assert (resolution, resolution) in found and len(found) >= 5
    assert set(found) == {(h, w) for w, h in found}  # wide and tall alike
    for width, height in found:
        assert width % step == 0 and height % step == 0
        assert abs(width * height / resolution**2 - 1) <= 0.15
        assert max(width / height, height / width) <= 2.0
    assert buckets.auto_buckets(256, 64) == [(192, 384), (192, 320), (256, 256), (320, 192), (384, 192)]


def test_config_resolves_auto_and_validates_explicit_buckets_naming_the_key():
    config = load_config("tiny", overrides=[KEEP_RATIO, "encode.buckets='auto'"])
    assert config.encode.buckets == [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
    assert "buckets = [[48, 96], [48, 80], [64, 64], [80, 48], [96, 48]]" in to_toml(config)
    sd = load_config(
        "tiny",
        overrides=[
            KEEP_RATIO,
            "encode.buckets='auto'",
            "encode.resolution=256",
            "ingest.image_size=256",
            "ingest.toy_image_size=256",
            'train.unet="sd15"',
        ],
    )
    assert sd.encode.buckets == buckets.auto_buckets(256, 64)
    assert load_config("tiny").encode.buckets is None  # unset: square centre crop, as before

    for value, problem in [
        ("[[64, 64], [60, 64]]", "60x64 has a side that is not a positive multiple of 8"),
        ("[[64, 64], [80, 40]]", "80x40 has a side that is not a positive multiple of 16"),  # the tiny UNet halves once
        ("[[64, 64], [80, 48], [64, 64]]", "64x64 listed more than once"),
        ("[]", "at least one"),
        ("'square'", "encode.buckets"),
    ]:
        with pytest.raises(ConfigError, match="encode.buckets") as error:
            load_config("tiny", overrides=[KEEP_RATIO, f"encode.buckets={value}"])
        assert problem in str(error.value)
    with pytest.raises(ConfigError, match="encode.buckets.*ingest.resize_mode = 'center_crop'"):
        load_config("tiny", overrides=["encode.buckets='auto'"])  # img2dataset would have made every image square
