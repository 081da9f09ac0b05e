import tomllib

import pytest

from pipeline.core.config import PRESETS, ConfigError, load_config, to_toml, validate


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_round_trip_through_toml(preset):
    config = load_config(preset)
    assert validate(tomllib.loads(to_toml(config))) == config


def test_tiny_preset_is_offline_and_sd15_names_real_models():
    tiny, sd = load_config("tiny"), load_config("sd15-256")
    assert tiny.ingest.source == "toy" and tiny.encode.vae.startswith("builtin:")
    assert tiny.train.zero_stage == 2 and tiny.train.num_workers == 2 and tiny.train.caption_dropout == 0.1
    assert tiny.sample.guidance_scales == [0.0, 1.0, 3.0, 7.5] and tiny.sample.judge == "toy"
    assert sd.ingest.url_list.endswith(".parquet") and (sd.ingest.url_column, sd.ingest.caption_column) == ("URL", "TEXT")
    assert sd.encode.text_encoder == "openai/clip-vit-large-patch14" and sd.encode.resolution == 256
    assert sd.train.unet == "sd15"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("train.bogus=1", "train.bogus"),
        ("encode.precision='fp8'", "encode.precision"),
        ("sample.steps=0", "sample.steps"),
        ("nonsense.x=1", "nonsense"),
        ("train.caption_dropout=1.5", "train.caption_dropout"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides=[override])
    assert key in str(error.value)


def test_user_file_merges_over_preset_and_overrides_win(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[train]\nmax_steps = 700\nlr = 0.001\n")
    config = load_config("tiny", path, ["train.lr=2e-4", "sample.scheduler=ddim"])
    assert config.train.max_steps == 700 and config.train.lr == 2e-4 and config.sample.scheduler == "ddim"
    assert config.train.num_workers == 2  # untouched preset value


def test_invalid_toml_file_is_a_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(None, path)


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="url_list"):
        load_config("tiny", overrides=["ingest.source='urls'"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config("tiny", overrides=["train.max_steps=10", "train.warmup_steps=20"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.deepspeed.train_micro_batch_size_per_gpu=4", "train.deepspeed.train_micro_batch_size_per_gpu"),
        ("train.deepspeed.gradient_accumulation_steps=2", "train.deepspeed.gradient_accumulation_steps"),
        ("train.deepspeed.train_batch_size=64", "train.deepspeed.train_batch_size"),
        ("train.deepspeed.zero_optimization.stage=3", "train.deepspeed.zero_optimization.stage"),
        ("train.deepspeed.bf16={enabled=true}", "train.deepspeed.bf16.enabled"),
        ("train.deepspeed.bf16=true", "train.deepspeed.bf16.enabled"),
        ("train.deepspeed.optimizer={type='Adam'}", "train.deepspeed.optimizer"),
    ],
)
def test_deepspeed_keys_the_pipeline_sets_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides=[override])
    message = str(error.value)
    assert key in message and "is set by the pipeline" in message


def test_train_options_round_trip_and_are_validated():
    config = load_config(
        "tiny",
        overrides=[
            "train.min_snr_gamma=5.0",
            "train.noise_offset=0.05",
            "train.max_nonfinite_streak=5",
            "train.max_failures=-1",
            "train.deepspeed.zero_optimization.overlap_comm=true",
            "train.deepspeed.fp16.initial_scale_power=12",
        ],
    )
    assert config.train.deepspeed == {"zero_optimization": {"overlap_comm": True}, "fp16": {"initial_scale_power": 12}}
    assert validate(tomllib.loads(to_toml(config))) == config
    defaults = load_config("tiny").train
    assert (defaults.min_snr_gamma, defaults.noise_offset, defaults.max_nonfinite_streak) == (None, 0.0, 20)
    assert (defaults.max_failures, defaults.deepspeed) == (0, {})
    for override in ("train.min_snr_gamma=0", "train.noise_offset=-0.1", "train.max_nonfinite_streak=0", "train.max_failures=-2"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config("tiny", overrides=[override])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["encode.resolution=128"], "ingest.image_size (64)"),
        (["encode.resolution=128", "ingest.image_size=128"], "ingest.toy_image_size (64)"),
        (["encode.resolution=128", "ingest.toy_image_size=128"], "ingest.image_size (64)"),
    ],
)
def test_encoding_above_the_ingested_size_is_refused_naming_both_keys(overrides, key):
    """Encode would upscale: a multi-resolution schedule ingests once at its largest resolution."""
    with pytest.raises(
        ConfigError, match=rf"encode\.resolution \(128\) is larger than {key.replace('(', '[(]').replace(')', '[)]')}"
    ):
        load_config("tiny", overrides=overrides)
    sizes = ["ingest.image_size=128", "ingest.toy_image_size=128"]
    assert load_config("tiny", overrides=[*sizes, "encode.resolution=64"]).encode.resolution == 64  # encoding smaller is fine
    assert load_config("tiny", overrides=[*sizes, "encode.resolution=128"]).encode.resolution == 128
