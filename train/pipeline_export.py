"""Whole-pipeline exports: an export folder that diffusers' `StableDiffusionPipeline.from_pretrained` loads.

Beside what `train.checkpoint.export_model` writes (`unet/`, `unet_online/`), a text-conditional export gets:
- `vae/`, `text_encoder/`, `tokenizer/`: the encoders that made the run's latents (their weights checked
  against encode/manifest.json), saved once per run under `train/components/` and shared into each export
  (hard links in a local run, server-side copies on an object store);
- `scheduler/`: the sampler the run validates with (`sample.scheduler`, `sample.timestep_spacing`) on the
  training schedule (prediction type, betas, zero terminal SNR);
- `model_index.json`, no safety checker (the model and its data are the user's);
- `README.md`, a model card: what was trained on what, how to load it, and the run's config.

A class-conditional UNet needs class labels StableDiffusionPipeline does not pass: its exports keep the
UNet, the sampler and classes.json only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core import layout
from pipeline.core.config import PipelineConfig, to_toml
from pipeline.core.rundir import RunDir
from pipeline.core.schedulers import make_scheduler
from train import distributed

COMPONENTS = ("vae", "text_encoder", "tokenizer")
LIBRARIES = {"vae": "diffusers", "text_encoder": "transformers", "tokenizer": "transformers"}
CLASSES_FILE = "classes.json"  # in train/components/: each component's class, for model_index.json


def sampler(config: PipelineConfig):
    """The scheduler the run samples with, on its training schedule."""
    from train.step import make_noise_scheduler

    return make_scheduler(config.sample.scheduler, make_noise_scheduler(config.train).config, config.sample.timestep_spacing)


def whole(config: PipelineConfig) -> bool:
    return config.train.conditioning == "text"


def shared_components(run: RunDir, config: PipelineConfig) -> dict[str, str]:
    """Export subfolder -> its folder under train/components/, written first if this run has none yet (rank 0)."""
    if not run.exists(f"{layout.TRAIN_COMPONENTS}/{layout.COMMIT_MARKER}"):
        from pipeline.core.identity import check_run_encoders

        manifest = run.read_json(layout.ENCODE_MANIFEST)
        encoders = check_run_encoders(config.encode, manifest, run.path(layout.ENCODE_MANIFEST))
        with tempfile.TemporaryDirectory(prefix="components-") as local:
            encoders.vae.save_pretrained(f"{local}/vae", safe_serialization=True)
            encoders.text_encoder.save_pretrained(f"{local}/text_encoder", safe_serialization=True)
            encoders.tokenizer.save_pretrained(f"{local}/tokenizer")
            classes = {name: type(getattr(encoders, name)).__name__ for name in COMPONENTS}
            Path(local, CLASSES_FILE).write_text(json.dumps(classes, indent=1))
            run.put_dir(local, layout.TRAIN_COMPONENTS)
        distributed.log(f"saved the run's encoders for its exports to {run.path(layout.TRAIN_COMPONENTS)}")
    return {name: f"{layout.TRAIN_COMPONENTS}/{name}" for name in COMPONENTS}


def write_pipeline_files(local: str, run: RunDir, config: PipelineConfig, step: int, scheduler_class: str) -> None:
    """model_index.json and README.md into the export being staged in `local` (its scheduler/, of `scheduler_class`,
    is written by the caller)."""
    import diffusers

    classes = json.loads(run.read_text(f"{layout.TRAIN_COMPONENTS}/{CLASSES_FILE}"))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **{name: [LIBRARIES[name], classes[name]] for name in COMPONENTS},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    Path(local, layout.EXPORT_MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    Path(local, layout.EXPORT_MODEL_CARD).write_text(model_card(run, config, step))


def model_card(run: RunDir, config: PipelineConfig, step: int) -> str:
    """README.md: what the model is, how to load it, what it was trained on, and the run's whole config."""
    manifest = run.read_json(layout.ENCODE_MANIFEST) if run.exists(layout.ENCODE_MANIFEST) else {}
    sample, train, encode = config.sample, config.train, config.encode
    prompt = (sample.prompts or ["a photo"])[0]
    rows = [
        ("step", f"{step:,} of {train.max_steps:,} (train.max_steps)"),
        ("run", run.url),
        (
            "images encoded",
            f"{manifest['samples']:,} in {manifest.get('latent_shard_count', '?')} shards"
            if "samples" in manifest
            else "see encode/manifest.json",
        ),
        ("resolution", f"{encode.resolution} px"),
        ("prediction type", train.prediction_type),
        ("VAE", f"{encode.vae}" + (f" (subfolder {encode.vae_subfolder})" if encode.vae_subfolder else "")),
        ("text encoder", encode.text_encoder),
        ("sampler", f"{sample.scheduler}, {sample.timestep_spacing} spacing, {sample.steps} steps"),
        ("weights", weights_row(config)),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    guidance = max(sample.guidance_scales or [7.5])
    adapter = train.lora is not None and not train.lora_fuse_export
    load_adapter = '\npipe.load_lora_weights("PATH/TO/THIS/FOLDER")  # the LoRA adapter on the base unet/' if adapter else ""
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [text-to-image, diffusers, t2i-pipeline]
---

# Text-to-image latent diffusion model, step {step:,}

Trained by t2i-pipeline from a LAION-style image-caption list: its VAE and text
encoder are the ones that encoded the training images; the UNet was trained on their latents.

| | |
|---|---|
{table}

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER"){load_adapter}
image = pipe({prompt!r}, num_inference_steps={sample.steps}, guidance_scale={guidance:g}, guidance_rescale={sample.guidance_rescale:g}).images[0]
```

Validation (per guidance scale, against this run's fixed prompts and seeds) is in the run's
`sample/validation.json` and `report/index.html`: the sample stage validates each export after it is written.
{validation_table(run)}
## The run's config

```toml
{to_toml(config).strip()}
```
"""


def weights_row(config: PipelineConfig) -> str:
    train = config.train
    which = "the moving average (train.ema_decay)" if train.ema_decay else "the trained weights"
    if train.lora is None:
        return f"unet/: {which}"
    lora = train.lora
    adapter = f"LoRA rank {lora.rank}, alpha {lora.scale_alpha:g} on {', '.join(lora.target_modules)}"
    if train.lora_fuse_export:
        return f"unet/: the base {train.init_from} with the adapter ({adapter}, {which}) fused in; the adapter alone in pytorch_lora_weights.safetensors"
    return f"unet/: the base {train.init_from}; pytorch_lora_weights.safetensors: the adapter ({adapter}), {which}"


def validation_table(run: RunDir) -> str:
    """The run's validations so far (the earlier exports', validated beside training), one metric per row and guidance."""
    if not run.exists(layout.SAMPLE_VALIDATION):
        return ""
    entries = run.read_json(layout.SAMPLE_VALIDATION).get("checkpoints", [])
    rows = [
        (entry["step"], metric, by_scale)
        for entry in entries
        for metric, by_scale in entry.get("metrics", {}).items()
        if by_scale and all(isinstance(value, (int, float)) for value in by_scale.values())
    ]
    if not rows:
        return ""
    scales = sorted({scale for _, _, by_scale in rows for scale in by_scale}, key=float)
    lines = [
        "\nValidated so far, before this export:\n",
        "| step | metric | " + " | ".join(f"guidance {scale}" for scale in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]
    for step, metric, by_scale in rows:
        cells = " | ".join(f"{by_scale[scale]:.3f}" if scale in by_scale else "" for scale in scales)
        lines.append(f"| {step:,} | {metric.replace('_', ' ')} | {cells} |")
    return "\n".join(lines) + "\n"
