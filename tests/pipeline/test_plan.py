"""`pipeline plan`: internally consistent estimates, each resting on named, sourced assumptions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plan import (
    BENCH_ENCODE_SAMPLES_PER_S,
    BENCH_TRAIN_SAMPLES_PER_S,
    PARAMS,
    TEXT_ENCODE_FLOPS,
    UNET_TRAIN_FLOPS,
    VAE_ENCODE_FLOPS,
    PlanError,
    PlanInputs,
    plan,
    preset_facts,
    quadratic_flops,
    render,
)

SCALES_WITH_IMAGES = [
    "download_hours",
    "raw_shard_bytes",
    "latent_bytes",
    "storage_bytes",
    "encode_gpu_hours",
    "encode_hours",
    "train_samples",
    "train_gpu_hours",
    "train_hours",
]
CASES = [("sd15", "A100-80GB", 64), ("sd15", "H100", 16), ("tiny", "CPU", 2), ("tiny", "L4", 8)]


def values(result):
    return {name: estimate["value"] for name, estimate in result["estimates"].items()}


@pytest.mark.parametrize("preset, gpu, gpus", CASES)
def test_doubling_images_doubles_time_storage_and_training_in_epochs(preset, gpu, gpus):
    facts = preset_facts(preset)
    one = values(plan(PlanInputs(images=1_000_000, preset=facts, gpu=gpu, gpus=gpus, epochs=3)))
    two = values(plan(PlanInputs(images=2_000_000, preset=facts, gpu=gpu, gpus=gpus, epochs=3)))
    for name in SCALES_WITH_IMAGES:
        assert two[name] == pytest.approx(2 * one[name], rel=1e-12), name
    assert two["bytes_per_sample"] == one["bytes_per_sample"] and two["train_epochs"] == one["train_epochs"] == 3


def test_in_steps_training_does_not_grow_with_images():
    facts = preset_facts("sd15")
    one, two = (
        values(plan(PlanInputs(images=images, preset=facts, gpu="A100-80GB", gpus=64, steps=1000)))
        for images in (10**6, 2 * 10**6)
    )
    assert two["train_gpu_hours"] == one["train_gpu_hours"] and two["train_epochs"] == one["train_epochs"] / 2


@pytest.mark.parametrize("preset, gpu, gpus", CASES)
def test_doubling_gpus_halves_train_wall_time_and_encode_only_with_its_actors(preset, gpu, gpus):
    facts = preset_facts(preset)
    actors = min(facts.encode_actors, gpus)
    one = values(plan(PlanInputs(images=10**7, preset=facts, gpu=gpu, gpus=gpus, epochs=2)))
    more_gpus = values(plan(PlanInputs(images=10**7, preset=facts, gpu=gpu, gpus=2 * gpus, epochs=2)))
    both = values(plan(PlanInputs(images=10**7, preset=facts, gpu=gpu, gpus=2 * gpus, encode_actors=2 * actors, epochs=2)))
    assert more_gpus["train_hours"] == pytest.approx(one["train_hours"] / 2, rel=1e-12)
    assert more_gpus["encode_hours"] == one["encode_hours"]  # encode runs on encode.num_actors, not on every GPU
    assert both["encode_hours"] == pytest.approx(one["encode_hours"] / 2, rel=1e-12)
    for name in ("encode_gpu_hours", "train_gpu_hours"):
        assert more_gpus[name] == pytest.approx(one[name], rel=1e-12), name


def test_sd15_encodes_on_its_8_actors_while_64_gpus_are_billed():
    facts = preset_facts("sd15")
    assert (facts.encode_actors, facts.workers) == (8, 64)
    result = values(plan(PlanInputs(images=10**8, preset=facts, gpu="A100-80GB", gpus=64)))
    assert result["encode_hours"] == pytest.approx(result["encode_gpu_hours"] / 8, rel=1e-12)
    assert result["encode_idle_gpu_hours"] == pytest.approx(result["encode_hours"] * 56, rel=1e-12)
    total = result["download_hours"] + result["encode_hours"] + result["train_hours"]
    assert result["total_hours"] == pytest.approx(total, rel=1e-12)
    # Actors beyond the GPUs do not count, and with one per GPU nothing idles.
    spread = plan(PlanInputs(images=10**8, preset=facts, gpu="A100-80GB", gpus=64, encode_actors=100))
    assert spread["inputs"]["encode_actors"] == 64 and "encode_idle_gpu_hours" not in spread["estimates"]
    assert "at most one per GPU" in spread["assumptions"]["encode_actors"]["source"]


def test_an_assumed_mfu_gives_a_range_down_to_what_sd_v1_achieved_and_a_given_one_does_not():
    facts = preset_facts("sd15")
    result = plan(PlanInputs(images=10**8, preset=facts, gpu="A100-80GB", gpus=64))
    estimates, low = result["estimates"], result["assumptions"]["mfu_low"]["value"]
    assert low == pytest.approx(estimates["check_sd_v1_implied_mfu"]["value"]) and 0 < low < 0.4
    for name in ("encode_hours", "train_hours", "train_gpu_hours"):
        assert estimates[name]["high"] == pytest.approx(estimates[name]["value"] * 0.4 / low, rel=1e-9), name
        assert "mfu_low" in estimates[name]["uses"]
    # Between the ends: download does not rest on the MFU.
    for name in ("total_hours", "cost_usd"):
        assert estimates[name]["value"] < estimates[name]["high"] < estimates[name]["value"] * 0.4 / low, name
    assert estimates["download_hours"]["high"] is None
    assert "total_hours " in render(result) and " to " in render(result).split("total_hours")[1].splitlines()[0]
    given = plan(PlanInputs(images=10**8, preset=facts, gpu="A100-80GB", gpus=64, mfu=0.3))
    assert "mfu_low" not in given["assumptions"] and all(e["high"] is None for e in given["estimates"].values())
    cpu = plan(PlanInputs(images=3000, preset=preset_facts("tiny"), gpu="CPU", gpus=1))  # bench rates: measured
    assert all(e["high"] is None for e in cpu["estimates"].values())


def test_storage_per_sample_is_fp16_latent_plus_text_as_the_encode_manifest_counts():
    sd = values(plan(PlanInputs(images=1000, preset=preset_facts("sd15"), resolution=256)))
    assert sd["bytes_per_sample"] == 2 * (4 * 32 * 32 + 77 * 768) == 126_464
    assert sd["latent_bytes"] == 1000 * sd["bytes_per_sample"]
    tiny = values(plan(PlanInputs(images=1000, preset=preset_facts("tiny"))))
    assert tiny["bytes_per_sample"] == 2 * (4 * 8 * 8 + 77 * 64)  # tests/ingest/encode/test_encode.py's manifest, one member
    assert tiny["storage_bytes"] == tiny["raw_shard_bytes"] + tiny["latent_bytes"]


def test_tiny_on_cpu_gives_back_the_measured_bench_rates():
    facts = preset_facts("tiny")
    result = values(plan(PlanInputs(images=3000, preset=facts, gpu="CPU", gpus=1, epochs=1)))
    assert 3000 / (result["train_gpu_hours"] * 3600) == pytest.approx(BENCH_TRAIN_SAMPLES_PER_S)
    assert 3000 / (result["encode_gpu_hours"] * 3600) == pytest.approx(BENCH_ENCODE_SAMPLES_PER_S)


@pytest.mark.parametrize("preset, gpu, gpus", CASES)
def test_every_estimate_rests_on_printed_sourced_assumptions(preset, gpu, gpus):
    result = plan(PlanInputs(images=10**6, preset=preset_facts(preset), gpu=gpu, gpus=gpus))
    assumptions = result["assumptions"]
    assert all(assumption["source"] for assumption in assumptions.values())
    for name, estimate in result["estimates"].items():
        assert estimate["uses"] and set(estimate["uses"]) <= set(assumptions), name
    # Published figures carry a URL; the others say they were measured, counted, given or assumed.
    kinds = ("http", "measured here", "counted here", "given", "assumed", "preset", "no default", "per node", "config.json")
    for name, assumption in assumptions.items():
        assert any(kind in assumption["source"] for kind in kinds), name
    text = render(result)
    lines = text.splitlines()
    for name, assumption in assumptions.items():
        assert any(line.split()[:1] == [name] and assumption["source"] in line for line in lines), name
    for name in result["estimates"]:
        line = next(line for line in lines if line.split()[:1] == [name])
        assert "[" in line and line.rstrip().endswith("]")


def test_sd15_cross_checks_against_the_sd_v1_model_card():
    result = values(plan(PlanInputs(images=10**8, preset=preset_facts("sd15"), gpu="A100-80GB", gpus=64)))
    assert 0 < result["check_sd_v1_implied_mfu"] < 1
    # The implied MFU over the assumed one is the ratio of the card's hours to this model's.
    assert result["check_sd_v1_a100_hours"] * 0.4 == pytest.approx(150_000 * result["check_sd_v1_implied_mfu"])


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"images": 0}, "--images"),
        ({"images": 10, "gpu": "V100"}, "--gpu"),
        ({"images": 10, "gpus": 0}, "--gpus"),
        ({"images": 10, "resolution": 100}, "--resolution"),
        ({"images": 10, "epochs": 1, "steps": 5}, "--epochs"),
        ({"images": 10, "mfu": 1.5}, "--mfu"),
    ],
)
def test_bad_input_names_the_option(kwargs, option):
    with pytest.raises(PlanError) as error:
        plan(PlanInputs(preset=preset_facts("sd15"), **kwargs))
    assert error.value.option == option and str(error.value).startswith(option)


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "pipeline"), "plan", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def test_cli_prints_tables_or_one_json_object():
    args = ["--images", "100000000", "--resolution", "256", "--preset", "sd15", "--gpu", "A100-80GB", "--gpus", "64"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Assumptions" in result.stdout and "cost_usd" in result.stdout
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["inputs"]["gpus"] == 64 and report["estimates"]["train_gpu_hours"]["value"] > 0
    assert report["assumptions"]["gpu_peak_flops"]["value"] == 312e12


@pytest.mark.parametrize(
    "args, option",
    [
        (["--images", "0"], "--images"),
        (["--images", "10", "--gpu", "V100"], "--gpu"),
        (["--images", "10", "--preset", "nope"], "--preset"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_option(args, option):
    result = cli(*args)
    assert result.returncode == 2 and option in result.stderr, result.stderr


def test_plan_module_imports_no_torch():
    code = "import sys, pipeline.plan as p; p.preset_facts('sd15'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_flop_constants_match_a_fresh_count():
    """Recount at 192 px, a resolution the constants were not fitted at (they were at 128, 256, 512)."""
    import json as json_module

    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.unet import build_unet

    def count(function):
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    meta, resolution, side = torch.device("meta"), 192, 24
    tiny_vae = json_module.loads(Path(__file__).parents[2].joinpath("pipeline/core/assets/tiny/vae/config.json").read_text())
    with meta:
        vaes = {
            "sd15": AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
                norm_num_groups=32,
            ),
            "tiny": AutoencoderKL(**{key: value for key, value in tiny_vae.items() if not key.startswith("_")}),
        }
        texts = {
            "sd15": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    attn_implementation="eager",
                )
            ),
            "tiny": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, attn_implementation="eager"
                )
            ),
        }
    tokens = torch.zeros(1, 77, dtype=torch.long, device=meta)
    pixels = torch.randn(1, 3, resolution, resolution, device=meta)
    latents, timestep = torch.randn(1, 4, side, side, device=meta), torch.tensor([1], device=meta)
    for model, width in (("sd15", 768), ("tiny", 64)):
        unet, vae, text = build_unet(model, width, side, on_meta=True), vaes[model], texts[model]
        unet.set_attn_processor(AttnProcessor())  # explicit matmuls, which the counter sees
        vae.set_attn_processor(AttnProcessor())
        assert sum(parameter.numel() for parameter in unet.parameters()) == PARAMS[model]
        context = torch.randn(1, 77, width, device=meta)
        train = count(lambda: unet(latents, timestep, context).sample.sum().backward())  # noqa: B023 (called at once)
        assert train == pytest.approx(quadratic_flops(UNET_TRAIN_FLOPS[model], resolution), rel=1e-9), model
        encode = count(lambda: vae.encode(pixels).latent_dist.mode())  # noqa: B023
        assert encode == pytest.approx(quadratic_flops(VAE_ENCODE_FLOPS[model], resolution), rel=1e-9), model
        assert count(lambda: text(tokens).last_hidden_state) == TEXT_ENCODE_FLOPS[model]  # noqa: B023
    unet = build_unet("micro", 64, side, on_meta=True)  # the tiny preset's UNet, on the tiny encoders
    unet.set_attn_processor(AttnProcessor())
    assert sum(parameter.numel() for parameter in unet.parameters()) == PARAMS["micro"]
    train = count(lambda: unet(latents, timestep, torch.randn(1, 77, 64, device=meta)).sample.sum().backward())
    assert train == pytest.approx(quadratic_flops(UNET_TRAIN_FLOPS["micro"], resolution), rel=1e-9)
