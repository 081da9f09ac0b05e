"""The sample stage: validate every committed export with fixed prompts, seeds and guidance scales.

For each committed `train/export/step-NNNNNNN/` not yet in `sample/validation.json` (or validated
with other sampling settings), it samples every prompt x seed at every guidance scale, writes
one image grid per (step, guidance scale) and, with the toy judge, the share of images whose
shape and background colours are the prompt's (prompt accuracy) and whose shape is the one asked
for (shape accuracy). A class-conditional UNet (train.conditioning) is validated per class
(`sample.conditions`): guidance then pushes from the null class towards the image's class.
`validation.json` is rewritten (atomically) after each checkpoint, so an interrupted stage
resumes where it stopped. While `pipeline run`
trains, `sample.watch` validates exports through the same `Validator` (sample.watch).

The VAE, text encoder and tokenizer are the ones the config names (`encode.*`), and their
weights must be the ones that made the training latents, as the encode manifest records them
(`pipeline.core.identity`); the unconditional branch uses the manifest's empty-caption embedding,
the exact tensor caption dropout trained on.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core import layout, models
from pipeline.core.arrays import from_base64_npy
from pipeline.core.config import PipelineConfig, SampleConfig
from pipeline.core.identity import check_run_encoders
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir, now
from pipeline.core.toy import parse_caption
from pipeline.core.trackers import Trackers, unlogged
from sample.conditions import Conditions, validation_conditions
from sample.export import load_export
from sample.grid import image_grid, png_bytes
from sample.guidance import ConditionRows, Sampling, sample_images
from sample.judge import is_correct, shape_of
from sample.metrics import Metrics

logger = get_logger("sample")

# What an entry of validation.json must agree on with the config to count as done.
SETTINGS = (
    "prompts",
    "class_labels",
    "seeds",
    "guidance_scales",
    "scheduler",
    "steps",
    "timestep_spacing",
    "guidance_rescale",
    "clip_model",
    "fid_inception",
    "fid_reference",
    "fid_reference_count",
)


def scale_key(guidance_scale: float) -> str:
    """7.5 -> "7.5", 3.0 -> "3": the key of a guidance scale in validation.json."""
    return f"{guidance_scale:g}"


def grid_path(step: int, guidance_scale: float) -> str:
    return f"{layout.SAMPLE_IMAGES}/{layout.step_name(step)}/guidance-{scale_key(guidance_scale)}.png"


def settings_of(sample: SampleConfig) -> dict[str, Any]:
    return {key: sample.model_dump(mode="json")[key] for key in SETTINGS}


def judged_metric(conditioning: str) -> str:
    """The toy judge's headline metric: prompt accuracy, or shape accuracy when there is no prompt to read colours from."""
    return "shape_accuracy" if conditioning == "class" else "prompt_accuracy"


def is_current(entry: dict[str, Any], settings: dict[str, Any], judged: str | None) -> bool:
    """Was this checkpoint validated with these settings (and measured `judged`, the judge's metric, if one is asked for)?"""
    if any(entry.get(key) != settings[key] for key in SETTINGS):
        return False
    return not judged or judged in entry.get("metrics", {})


def best_of(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The (step, guidance scale) with the highest prompt accuracy (class-conditional: shape accuracy;
    without the toy judge: CLIP score); ties go to the later step."""
    for metric in ("prompt_accuracy", "shape_accuracy", "clip_score"):
        candidates = [
            (value, entry["step"], float(key))
            for entry in checkpoints
            for key, value in entry.get("metrics", {}).get(metric, {}).items()
        ]
        if candidates:
            value, step, guidance_scale = max(candidates, key=lambda c: (c[0], c[1], -c[2]))
            return {"step": step, "guidance_scale": guidance_scale, metric: value}
    return None


def record(run: RunDir, validation: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Put `entry` into validation.json (replacing that step's old one), re-pick the best, write atomically.

    Only one writer at a time: the watcher beside training, or afterwards the sample stage."""
    others = [e for e in validation["checkpoints"] if e["step"] != entry["step"]]
    checkpoints = sorted([*others, {**entry, "validated_at": now()}], key=lambda e: e["step"])
    validation = {**validation, "checkpoints": checkpoints, "best": best_of(checkpoints)}
    run.write_json(layout.SAMPLE_VALIDATION, validation)
    return validation


def read_validation(run: RunDir) -> dict[str, Any]:
    return run.read_json(layout.SAMPLE_VALIDATION, default={"checkpoints": [], "best": None})


def pending_steps(
    sample: SampleConfig, run: RunDir, validation: dict[str, Any], conditioning: str = "text"
) -> tuple[list[int], list[int]]:
    """(committed exports, those not validated with the current settings)."""
    settings = settings_of(sample)
    judged = judged_metric(conditioning) if sample.judge == "toy" else None
    done = {entry["step"] for entry in validation["checkpoints"] if is_current(entry, settings, judged)}
    exported = run.committed_steps(layout.TRAIN_EXPORT)
    return exported, [step for step in exported if step not in done]


def check_export_classes(step: int, unet, classes: dict[str, Any] | None, conditions: Conditions) -> None:
    """The export's class embedding (and classes.json) fits the classes validation asks for; raises ValueError."""
    wanted = None if conditions.null_class is None else conditions.null_class + 1
    if unet.config.num_class_embeds != wanted:
        raise ValueError(
            f"UNet of step {step} has num_class_embeds = {unet.config.num_class_embeds}, but validation needs "
            f"{wanted or 'none'} (train.conditioning and the encode manifest's classes)"
        )
    if wanted is not None and classes is not None and classes.get("null_class") != conditions.null_class:
        raise ValueError(
            f"{layout.EXPORT_CLASSES} of step {step} lists {classes.get('classes')}, not the encode manifest's classes"
        )


def export_latents(unet, manifest: dict[str, Any]) -> tuple[list[int], int | None]:
    """(latent shape, image side) an export samples at: the latents it was trained on, which its sample_size
    records. They are the encode manifest's but for an export of an earlier phase of a multi-resolution
    schedule (train.phases), validated at the resolution it was trained at, and labelled with it."""
    channels, side = manifest["latent_shape"][0], manifest["latent_shape"][-1]
    trained = int(unet.config.sample_size or side)
    resolution = trained * (manifest["resolution"] // side) if manifest.get("resolution") else None
    return [channels, trained, trained], resolution


def check_inputs(config: PipelineConfig, manifest: dict[str, Any]) -> None:
    """Fail before any work on prompts the judge cannot read or a manifest missing what we need."""
    if config.sample.judge == "toy" and config.train.conditioning != "class":
        for index, prompt in enumerate(config.sample.prompts):
            try:
                parse_caption(prompt)
            except ValueError:
                raise ValueError(f"sample.prompts[{index}] = {prompt!r} is not a toy caption, but sample.judge = 'toy'") from None
    for key in ("vae", "text_encoder", "latent_shape"):
        if key not in manifest:
            raise KeyError(f"{layout.ENCODE_MANIFEST} has no {key!r}")


@dataclass
class Validator:
    """Everything validating a checkpoint needs but the checkpoint, loaded once: the VAE, the prompt
    and empty-caption embeddings and the optional metrics' models."""

    run: RunDir
    sample: SampleConfig
    manifest: dict[str, Any]
    vae: torch.nn.Module
    conditions: Conditions
    prompt_embeddings: torch.Tensor  # one per condition row (the empty caption's where a row has no prompt)
    empty_embedding: torch.Tensor
    metrics: Metrics
    device: torch.device
    conditioning: str = "text"

    @classmethod
    def load(cls, config: PipelineConfig, run: RunDir) -> Validator:
        sample = config.sample
        manifest = run.read_json(layout.ENCODE_MANIFEST)
        check_inputs(config, manifest)
        conditions = validation_conditions(config, manifest)
        encoders = check_run_encoders(config.encode, manifest, where=run.path(layout.ENCODE_MANIFEST))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vae, text_encoder = encoders.vae.to(device), encoders.text_encoder.to(device)
        tokenizer = encoders.tokenizer
        if "empty_caption_embedding" in manifest:
            empty_embedding = torch.from_numpy(from_base64_npy(manifest["empty_caption_embedding"])).float()
        else:  # older manifests: the same text encoder on "" gives the same tensor
            empty_embedding = models.encode_prompts(tokenizer, text_encoder, [""]).float().cpu()[0]
        prompts = [prompt for prompt in conditions.prompts if prompt is not None]
        encoded = iter(models.encode_prompts(tokenizer, text_encoder, prompts).float().cpu() if prompts else [])
        rows = [empty_embedding if prompt is None else next(encoded) for prompt in conditions.prompts]
        prompt_embeddings = torch.stack(rows) if rows else empty_embedding[None][:0]
        if empty_embedding.shape != prompt_embeddings.shape[1:]:
            raise ValueError(
                f"empty-caption embedding {tuple(empty_embedding.shape)} does not match the prompt embeddings "
                f"{tuple(prompt_embeddings.shape[1:])} of text encoder {config.encode.text_encoder!r}"
            )
        del text_encoder, encoders
        metrics = Metrics.load(config, run, device)
        return cls(
            run, sample, manifest, vae, conditions, prompt_embeddings, empty_embedding, metrics, device, config.train.conditioning
        )

    def validate(self, step: int) -> dict[str, Any]:
        """Sample every prompt x seed at every guidance scale of one export; write the grids; return its entry."""
        with tempfile.TemporaryDirectory(prefix="sample-") as scratch:
            unet, scheduler_config, classes = load_export(self.run, step, scratch, self.device, with_classes=True)
        check_export_classes(step, unet, classes, self.conditions)
        if unet.config.cross_attention_dim != self.prompt_embeddings.shape[-1]:
            raise ValueError(
                f"UNet of step {step} expects {unet.config.cross_attention_dim}-d text embeddings, "
                f"the text encoder gives {self.prompt_embeddings.shape[-1]}"
            )
        sample, run = self.sample, self.run
        started = time.monotonic()
        conditions, judged = self.conditions, sample.judge == "toy"
        condition_rows = ConditionRows(self.prompt_embeddings, self.empty_embedding, conditions.labels, conditions.null_class)
        specs = [parse_caption(p) for p in conditions.prompts] if judged and self.conditioning != "class" else None
        shapes = conditions.shape_targets() if judged else []
        latent_shape, resolution = export_latents(unet, self.manifest)
        entry: dict[str, Any] = {"step": step, "resolution": resolution, **settings_of(sample), "conditioning": self.conditioning}
        entry.update(metrics={}, images={})
        if conditions.labels is not None:
            entry["conditions"] = conditions.texts
        for guidance_scale in sample.guidance_scales:
            scale_started = time.monotonic()
            key = scale_key(guidance_scale)
            images = sample_images(
                unet,
                self.vae,
                scheduler_config,
                condition_rows,
                Sampling.from_config(sample, guidance_scale),
                latent_shape,
                self.manifest["vae"]["scaling_factor"],
            )
            grid = grid_path(step, guidance_scale)
            run.write_bytes(grid, png_bytes(image_grid(images, conditions.texts)))
            entry["images"][key] = grid
            measured = self.metrics.measure(images, conditions.texts)
            judged_shapes = [(shape, row) for shape, row in zip(shapes, images) if shape is not None]
            if judged_shapes:
                correct = sum(shape_of(image) == shape for shape, row in judged_shapes for image in row)
                measured = {"shape_accuracy": correct / (len(judged_shapes) * images.shape[1]), **measured}
            if specs is not None:
                correct = sum(is_correct(image, spec) for spec, row in zip(specs, images) for image in row)
                measured = {"prompt_accuracy": correct / (images.shape[0] * images.shape[1]), **measured}
            for name, value in measured.items():
                entry["metrics"].setdefault(name, {})[key] = value
            shown = ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in measured.items())
            logger.info(
                f"step {step} guidance {key}: {images.shape[0] * images.shape[1]} images"
                f"{', ' + shown if shown else ''} ({time.monotonic() - scale_started:.1f}s): {run.path(grid)}"
            )
        entry["skipped_metrics"] = dict(self.metrics.skipped)
        entry["seconds"] = round(time.monotonic() - started, 3)
        return entry


def has_conditions(config: PipelineConfig) -> bool:
    """Is there anything to validate? Prompts, or (class conditioning) the classes, which always exist."""
    return bool(config.sample.prompts) or config.train.conditioning == "class"


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    summary = validate_pending(config, run)
    if unlogged(run):  # training is over: this stage is the trackers' one writer now (opened only with something to log)
        trackers = Trackers.of(config.train, run)
        logged = trackers.new_validations(run)
        if logged:
            logger.info(f"logged the validations of steps {logged} to {', '.join(tracker.name for tracker in trackers.active)}")
        trackers.close()
    return summary


def validate_pending(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    """Validate every committed export not validated with the current settings; the stage's summary."""
    sample = config.sample
    validation = read_validation(run)
    exported, todo = pending_steps(sample, run, validation, config.train.conditioning)
    watched = sum(bool(entry.get("during_training")) for entry in validation["checkpoints"])
    # run.json keeps this summary in the stage's entry (the runner prints its "counts").
    summary = {
        "validated": [],
        "best": validation.get("best"),
        "counts": {"checkpoints": len(exported), "newly_validated": 0, "images": 0, "validated_during_training": watched},
    }
    if not has_conditions(config):
        logger.info("no sample.prompts configured: nothing to validate")
        return summary
    if not todo:
        logger.info(f"all {len(exported)} committed exports already validated")
        return summary

    validator = Validator.load(config, run)
    rows = len(validator.conditions)
    logger.info(
        f"validating steps {todo} ({rows} {'prompts' if validator.conditions.labels is None else 'conditions'} "
        f"x {len(sample.seeds)} seeds, "
        f"guidance {[scale_key(s) for s in sample.guidance_scales]}, {sample.scheduler} {sample.steps} steps, "
        f"{validator.device})"
    )
    for step in todo:
        entry = validator.validate(step)
        validation = record(run, validation, entry)
        summary["validated"].append(step)
        summary["counts"]["newly_validated"] += 1
        summary["counts"]["images"] += rows * len(sample.seeds) * len(sample.guidance_scales)
        logger.info(f"step {step} done in {entry['seconds']:.1f}s")
    summary["best"] = validation["best"]
    return summary
