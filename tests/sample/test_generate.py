"""`pipeline sample RUN --prompt ...`, and the export inside diffusers' StableDiffusionPipeline."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_support import PROMPTS, RESOLUTION, sample_config
from typer.testing import CliRunner

from pipeline import cli as pipeline_cli
from pipeline.core import layout
from pipeline.core.config import to_toml
from sample import export, generate
from sample.guidance import Sampling


# Scales above 1 only: for s <= 1 diffusers skips guidance and samples the conditional model, where
# s = 0 here is the unconditional one (see sample.guidance). guidance_rescale is diffusers' own.
@pytest.mark.parametrize(
    ("scheduler", "guidance_scale", "guidance_rescale"),
    [("ddim", 7.5, 0.0), ("dpmsolver++", 3.0, 0.0), ("dpmsolver++", 7.5, 0.7), ("euler", 1.5, 0.0), ("ddpm", 7.5, 0.7)],
)
def test_stable_diffusion_pipeline_draws_the_same_images(
    synthetic_run, model_dirs, tmp_path, scheduler, guidance_scale, guidance_rescale
):
    config = sample_config(model_dirs)
    checkpoint = export.load_checkpoint(synthetic_run, config, 20, str(tmp_path), torch.device("cpu"))
    seeds = [3, 11]
    sampling = Sampling(guidance_scale, seeds, 4, scheduler, guidance_rescale=guidance_rescale)
    ours = generate.generate(checkpoint, PROMPTS, sampling, negative_prompt="")

    pipe = generate.stable_diffusion_pipeline(checkpoint, scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=[prompt for prompt in PROMPTS for _ in seeds],
        negative_prompt=[""] * len(PROMPTS) * len(seeds),
        generator=[torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS for seed in seeds],
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        output_type="np",
    ).images
    theirs = (theirs * 255).round().astype(np.uint8).reshape(ours.shape)
    assert ours.shape == (2, 2, RESOLUTION, RESOLUTION, 3)
    # (x + 1) * 127.5 against (x / 2 + 0.5) * 255: equal but for float rounding at .5.
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert not np.array_equal(ours[0, 0], ours[0, 1])  # the seeds matter, so the check has teeth
    if guidance_rescale:  # and so does the rescale
        plain = generate.generate(checkpoint, PROMPTS, replace(sampling, guidance_rescale=0.0), negative_prompt="")
        assert np.abs(ours.astype(int) - plain.astype(int)).max() > 1


def test_default_negative_prompt_is_the_manifests_empty_caption(synthetic_run, model_dirs, tmp_path):
    config = sample_config(model_dirs)
    checkpoint = export.load_checkpoint(synthetic_run, config, None, str(tmp_path), torch.device("cpu"))
    assert checkpoint.step == 20  # the latest export
    sampling = Sampling(guidance_scale=7.5, seeds=[0], steps=3, scheduler="ddim")
    default = generate.generate(checkpoint, PROMPTS[:1], sampling)
    explicit_other = generate.generate(checkpoint, PROMPTS[:1], sampling, negative_prompt="a black background")
    assert not np.array_equal(default, explicit_other)


def test_unknown_checkpoint_names_the_committed_ones(synthetic_run):
    with pytest.raises(ValueError, match=r"checkpoint 15 is not a committed export; committed: \[10, 20\]"):
        export.pick_step(synthetic_run, 15)


def test_png_names_are_sortable_and_safe():
    assert generate.png_name(3, "A red circle, on a BLUE background!", 7) == "003-a-red-circle-on-a-blue-background-seed7.png"
    assert generate.png_name(0, "", 1) == "000-empty-seed1.png"


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "pipeline"), "sample", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_writes_one_png_per_prompt_and_seed(synthetic_run, model_dirs, tmp_path):
    config = sample_config(model_dirs)
    synthetic_run.write_text(layout.CONFIG, to_toml(config))
    out = tmp_path / "pngs"
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "5", "--seed", "6", "--guidance", "3"]
    result = cli(synthetic_run.url, *args, "--steps", "3", "--scheduler", "euler", "--checkpoint", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(path.name for path in out.iterdir())
    assert names == [generate.png_name(p, prompt, seed) for p, prompt in enumerate(PROMPTS) for seed in (5, 6)]
    assert result.stdout.split() == [str(out / name) for name in names]

    checkpoint = export.load_checkpoint(synthetic_run, config, 10, str(tmp_path), torch.device("cpu"))
    assert config.sample.guidance_rescale == 0.7  # the CLI samples with the config's rescale
    sampling = Sampling(guidance_scale=3.0, seeds=[5, 6], steps=3, scheduler="euler", guidance_rescale=0.7)
    expected = generate.generate(checkpoint, PROMPTS, sampling)
    written = np.stack([np.asarray(Image.open(out / name)) for name in names]).reshape(expected.shape)
    np.testing.assert_array_equal(written, expected)
    assert not synthetic_run.exists(layout.SAMPLE_VALIDATION)  # the validation stage did not run


def test_cli_refuses_bad_arguments_naming_them(synthetic_run, model_dirs):
    """In this process (typer's CliRunner): refusing arguments needs no fresh interpreter."""
    synthetic_run.write_text(layout.CONFIG, to_toml(sample_config(model_dirs)))

    def cli_here(*args: str):
        result = CliRunner().invoke(pipeline_cli.app, ["sample", *args])
        return result.exit_code, result.output

    code, output = cli_here(synthetic_run.url, "--prompt", "x")
    assert code == 2 and "--prompt needs --out" in output
    code, output = cli_here(synthetic_run.url, "--steps", "4")
    assert code == 2 and "go with --prompt" in output
    code, output = cli_here(synthetic_run.url, "--prompt", "x", "--out", "/tmp/never", "--scheduler", "heun")
    assert code == 2 and "'heun'" in output and "dpmsolver++" in output
    code, output = cli_here(synthetic_run.url, "--prompt", "x", "--out", "/tmp/never", "--checkpoint", "15")
    assert code == 2 and "committed: [10, 20]" in output
