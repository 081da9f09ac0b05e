"""Images from one exported checkpoint (`pipeline sample RUN --prompt ...`), and the same
checkpoint assembled into a diffusers `StableDiffusionPipeline`.

Both use the VAE, tokenizer and text encoder the run's config names, refused unless their
weights made the training latents (`pipeline.core.identity`). Without a negative prompt the
unconditional branch uses the manifest's empty-caption embedding, the tensor caption dropout
trained on; a negative prompt (even "") is encoded by the text encoder, as diffusers does. A
class-conditional export (its classes.json) samples named classes (`--class`), against the null class.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import PipelineConfig
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir
from sample.export import Checkpoint, load_checkpoint
from sample.guidance import ConditionRows, Sampling, make_scheduler, sample_images

logger = get_logger("sample")


def generate(
    checkpoint: Checkpoint,
    prompts: list[str],
    sampling: Sampling,
    negative_prompt: str | None = None,
    class_names: list[str] | None = None,
) -> np.ndarray:
    """uint8 images [rows, len(sampling.seeds), H, W, 3]: one row per prompt, or for a class-conditional
    checkpoint per class (conditioning 'class') or per (prompt, class) pair (see `condition_rows`)."""
    uncond = checkpoint.empty_embedding if negative_prompt is None else checkpoint.embed([negative_prompt])[0]
    rows, labels = condition_rows(checkpoint, prompts, class_names or [])
    embedded = _embed_rows(checkpoint, rows)
    embeddings = torch.stack([checkpoint.empty_embedding if row is None else embedding for row, embedding in zip(rows, embedded)])
    null_class = None if labels is None else checkpoint.classes["null_class"]
    conditions = ConditionRows(embeddings, uncond, labels, null_class)
    return sample_images(
        checkpoint.unet,
        checkpoint.vae,
        checkpoint.scheduler_config,
        conditions,
        sampling,
        checkpoint.latent_shape,
        checkpoint.scaling_factor,
    )


def condition_rows(
    checkpoint: Checkpoint, prompts: list[str], class_names: list[str]
) -> tuple[list[str | None], list[int] | None]:
    """(prompt per row, None for the empty caption; class index per row, or None for a text-only checkpoint)."""
    if checkpoint.classes is None:
        if class_names:
            raise ValueError(f"checkpoint {checkpoint.step} is not class-conditional: --class does not apply")
        return list(prompts), None
    known = checkpoint.classes["classes"]
    if not class_names or any(name not in known for name in class_names):
        raise ValueError(f"checkpoint {checkpoint.step} is class-conditional: name classes with --class, from {known}")
    if checkpoint.classes["conditioning"] == "class":
        if prompts:
            raise ValueError(f"checkpoint {checkpoint.step} is conditioned on classes only: drop --prompt")
        return [None] * len(class_names), [known.index(name) for name in class_names]
    pairs = [(prompt, name) for prompt in prompts for name in class_names]
    return [p for p, _ in pairs], [known.index(n) for _, n in pairs]


def row_names(prompts: list[str], class_names: list[str]) -> list[str]:
    """What names each row's PNGs, in `condition_rows`' order."""
    if not class_names:
        return list(prompts)
    if not prompts:
        return list(class_names)
    return [f"{prompt} {name}" for prompt in prompts for name in class_names]


def _embed_rows(checkpoint: Checkpoint, rows: list[str | None]) -> list[torch.Tensor | None]:
    prompts = [row for row in rows if row is not None]
    encoded = iter(checkpoint.embed(prompts) if prompts else [])
    return [None if row is None else next(encoded) for row in rows]


def png_name(index: int, prompt: str, seed: int) -> str:
    """'003-a-red-circle-on-a-blue-background-seed7.png': sortable, readable, safe on any filesystem."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"{index:03d}-{slug}-seed{seed}.png"


def write_pngs(images: np.ndarray, prompts: list[str], seeds: list[int], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (prompt, row) in enumerate(zip(prompts, images)):
        for seed, image in zip(seeds, row):
            path = out / png_name(index, prompt, seed)
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths


def stable_diffusion_pipeline(checkpoint: Checkpoint, scheduler: str, timestep_spacing: str = "trailing"):
    """The checkpoint as a diffusers `StableDiffusionPipeline` (no safety checker: the model is the user's)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=checkpoint.vae,
        text_encoder=checkpoint.text_encoder,
        tokenizer=checkpoint.tokenizer,
        unet=checkpoint.unet,
        scheduler=make_scheduler(scheduler, checkpoint.scheduler_config, timestep_spacing),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sample_command(
    run: RunDir,
    config: PipelineConfig,
    prompts: list[str],
    out_dir: str,
    sampling: Sampling,
    negative_prompt: str | None,
    step: int | None,
    class_names: list[str] | None = None,
) -> list[Path]:
    """What `pipeline sample RUN --prompt/--class ...` does: sample one checkpoint, write PNGs (progress on stderr)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sample-") as scratch:
        checkpoint = load_checkpoint(run, config, step, scratch, device)
        logger.info(
            f"step {checkpoint.step}: {len(prompts)} prompt(s), {len(class_names or [])} class(es), "
            f"{len(sampling.seeds)} seed(s), guidance "
            f"{sampling.guidance_scale:g}, {sampling.scheduler} {sampling.steps} steps, {device}"
        )
        images = generate(checkpoint, prompts, sampling, negative_prompt, class_names)
    return write_pngs(images, row_names(prompts, class_names or []), list(sampling.seeds), out_dir)
