"""`pipeline bench sample`: the fewest steps at which a scheduler matches 1000-step DDPM.

The reference is DDPM with `ddpm_steps` steps (1000: one per training timestep) and plain
guidance on the run's latest export, over the config's prompts x `seeds` at one guidance scale;
its prompt accuracy is the toy judge's share of correct images, as in the sample stage
(`sample.validate.stage`). Each scheduler then samples with the config's `sample.guidance_rescale`
(the sample stage's setting) and walks up `ladder` to the first step count whose accuracy is
within `tolerance` of the reference. Accuracy is not monotone in steps (a step count can be
lucky on 48 images), so the first hit is reported, not a bisection, and every accuracy seen is
in the JSON. `speedup` = ddpm_steps / the fewest steps of any scheduler; `wall_speedup`
compares the seconds of the same two runs.

What keeps it short: the ladder ends at 40 steps, past which speedup 25 is out of reach; the
schedulers run in `SCHEDULERS`' order, the config's default first, and once one hits at N steps
the others only walk the rungs below N (`below` in their entry), since they can no longer be the
fastest. Two seeds per prompt (the sample stage's), 48 images on the tiny preset.
`config_sampler` is the sample stage's own scheduler and steps (`sample.scheduler`,
`sample.steps`), measured once against the same bar.

Every (scheduler, steps) samples all prompts x seeds in one `generate` call on one intra-op
thread (the tiny UNet gains nothing from more), with the config's timestep spacing. On 2
shared cores one UNet step of 48 images takes about 0.3-0.4 s: the reference is 5-7 minutes,
and the whole bench about 8-10.

    make demo                   # trains runs/demo, which the bench reads (it never trains)
    pipeline bench sample       # or --run DIR
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import Stopwatch, logger, torch_threads
from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.rundir import RunDir
from pipeline.core.toy import ToySpec, parse_caption
from sample.export import Checkpoint
from sample.guidance import Sampling
from sample.judge import is_correct

DEFAULT_RUN = "runs/demo"
DDPM_STEPS = 1000
# Up to 40 = DDPM_STEPS / 25: past it a scheduler cannot meet the speedup target of 25.
LADDER = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40)
# The sample stage's two seeds per prompt: 48 images on the tiny preset (one image moves accuracy
# by ~0.02), which halves the 1000-step reference (13.9 minutes for 96 images on 2 busy cores).
SEEDS = (0, 1)
TOLERANCE = 0.05
# The sample stage's default first (the likely fastest: a hit there shortens every later ladder);
# ddpm itself last, as it needs the most steps.
SCHEDULERS = ("dpmsolver++", "euler", "ddim", "ddpm")

log = logger("sample")


def prompt_accuracy(images: np.ndarray, specs: list[ToySpec]) -> float:
    """Share of images [P, S, H, W, 3] that show their prompt's colours (the sample stage's metric)."""
    correct = sum(is_correct(image, spec) for spec, row in zip(specs, images) for image in row)
    return correct / (images.shape[0] * images.shape[1])


def first_hit(measure, ladder: list[int], threshold: float) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """Walk up `ladder`, calling `measure(steps) -> (accuracy, seconds)`; stop at the first step
    count whose accuracy reaches `threshold`. Returns (that count or None, everything measured)."""
    seen: dict[int, tuple[float, float]] = {}
    for steps in ladder:
        seen[steps] = measure(steps)
        if seen[steps][0] >= threshold:
            return steps, seen
    return None, seen


def search_all(measure, schedulers: tuple[str, ...], rungs: list[int], threshold: float) -> dict[str, dict[str, Any]]:
    """Each scheduler's `_search` entry, in order, calling `measure(name, steps)`. Once one hits at
    N steps, the later ones walk only the rungs below N: at N or more they cannot be the fastest."""
    entries: dict[str, dict[str, Any]] = {}
    best: int | None = None
    for name in schedulers:
        below = [steps for steps in rungs if best is None or steps < best]
        entries[name] = _search(partial(measure, name), below, threshold)
        entries[name]["below"] = best
        if entries[name]["steps"] is not None:
            best = entries[name]["steps"]
    return entries


def _missing_run_message(run_dir: RunDir) -> str | None:
    if not run_dir.exists(layout.CONFIG):
        return (
            f"{run_dir.path(layout.CONFIG)} not found: the sample bench needs a trained run. "
            f"Run `make demo` first (it trains the tiny demo into {DEFAULT_RUN}), or pass --run DIR."
        )
    if not run_dir.committed_steps(layout.TRAIN_EXPORT):
        return f"{run_dir.path(layout.TRAIN_EXPORT)} holds no committed export: run `make demo` first, or pass --run DIR."
    return None


def run_bench(
    cpus: int = 2,
    run: str = DEFAULT_RUN,
    guidance_scale: float = 7.5,
    seeds: tuple[int, ...] = SEEDS,
    ddpm_steps: int = DDPM_STEPS,
    ladder: tuple[int, ...] = LADDER,
    tolerance: float = TOLERANCE,
    schedulers: tuple[str, ...] = SCHEDULERS,
    guidance_rescale: float | None = None,
) -> dict[str, Any]:
    """`cpus` is taken for the CLI's uniform call only: sampling runs here, on one thread.
    `guidance_rescale`: the schedulers' (None: the config's `sample.guidance_rescale`); the reference's is 0."""
    run_dir, config = _trained_run(run)
    rescale = config.sample.guidance_rescale if guidance_rescale is None else guidance_rescale
    prompts, seeds = list(config.sample.prompts), [int(seed) for seed in seeds]
    specs = [parse_caption(prompt) for prompt in prompts]  # a ValueError names a prompt the judge cannot read
    images = len(prompts) * len(seeds)
    batch_size = max(config.sample.batch_size, images)  # one batch: every image of a run together
    spacing = config.sample.timestep_spacing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch_threads(1):
        total = Stopwatch()
        checkpoint = _load_latest(run_dir, config, device)
        reference = Sampling(guidance_scale, seeds, ddpm_steps, "ddpm", spacing, batch_size)

        def measure(scheduler: str, steps: int) -> tuple[float, float]:
            sampling = replace(reference, scheduler=scheduler, steps=steps, guidance_rescale=rescale)
            return _measure(checkpoint, prompts, specs, sampling)

        log(
            f"{run_dir.url} step {checkpoint.step}: {len(prompts)} prompts x seeds {seeds}, guidance "
            f"{guidance_scale:g} (rescale {rescale:g}), {spacing} spacing, {device}; reference ddpm {ddpm_steps} steps"
        )
        reference_accuracy, reference_seconds = _measure(checkpoint, prompts, specs, reference)
        rungs = sorted(steps for steps in set(ladder) if steps < ddpm_steps)
        threshold = reference_accuracy - tolerance - 1e-9
        per_scheduler = search_all(measure, schedulers, rungs, threshold)
        default_accuracy, default_seconds = measure(config.sample.scheduler, config.sample.steps)

    best = _fastest(per_scheduler, images)
    return {
        "bench": "sample",
        "speedup": ddpm_steps / best["steps"] if best else None,
        "wall_speedup": round(reference_seconds / best["seconds"], 2) if best else None,
        "fastest": best,
        "ddpm_steps": ddpm_steps,
        "reference_accuracy": round(reference_accuracy, 4),
        "reference_seconds": round(reference_seconds, 2),
        "reference_images_per_s": round(images / reference_seconds, 3),
        "tolerance": tolerance,
        "per_scheduler": per_scheduler,
        "config_sampler": {
            "scheduler": config.sample.scheduler,
            "steps": config.sample.steps,
            "accuracy": round(default_accuracy, 4),
            "seconds": round(default_seconds, 2),
            "within_tolerance": default_accuracy >= threshold,
        },
        "run": run_dir.url,
        "checkpoint": checkpoint.step,
        "guidance_scale": guidance_scale,
        "guidance_rescale": rescale,
        "reference_guidance_rescale": reference.guidance_rescale,
        "seeds": seeds,
        "prompts": len(prompts),
        "images": images,
        "ladder": rungs,
        "timestep_spacing": spacing,
        "batch_size": batch_size,
        "threads": 1,
        "device": device.type,
        "total_seconds": round(total.seconds, 1),
    }


def _trained_run(run: str) -> tuple[RunDir, PipelineConfig]:
    """The run directory and its config; FileNotFoundError (saying what to do) without a trained run."""
    from pipeline.runner import load_run_config

    run_dir = RunDir(run)
    missing = _missing_run_message(run_dir)
    if missing:
        raise FileNotFoundError(missing)
    return run_dir, load_run_config(run_dir)


def _load_latest(run_dir: RunDir, config: PipelineConfig, device: torch.device) -> Checkpoint:
    from sample.export import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-sample-") as scratch:
        return load_checkpoint(run_dir, config, None, scratch, device)


def _measure(checkpoint: Checkpoint, prompts: list[str], specs: list[ToySpec], sampling: Sampling) -> tuple[float, float]:
    """(prompt accuracy, seconds) of one `generate` call: every prompt x seed in one batch."""
    from sample.generate import generate

    with Stopwatch() as watch:
        sampled = generate(checkpoint, prompts, sampling)
    accuracy = prompt_accuracy(sampled, specs)
    log(f"{sampling.scheduler} {sampling.steps} steps: accuracy {accuracy:.3f} ({watch.seconds:.1f}s)")
    return accuracy, watch.seconds


def _search(measure, rungs: list[int], threshold: float) -> dict[str, Any]:
    """One scheduler's JSON entry: `first_hit` on `measure(steps)` up the rungs."""
    with Stopwatch() as search:
        steps, seen = first_hit(measure, rungs, threshold)
    accuracy, seconds = seen[steps] if steps is not None else (None, None)
    return {
        "steps": steps,
        "accuracy": _round(accuracy),
        "seconds": _round(seconds, 2),
        "ladder": {str(n): round(a, 4) for n, (a, _) in seen.items()},
        "search_seconds": round(search.seconds, 2),
    }


def _fastest(per_scheduler: dict[str, dict], images: int) -> dict[str, Any] | None:
    """The scheduler that reached the bar in the fewest steps (then seconds), or None if none did."""
    hits = {name: entry for name, entry in per_scheduler.items() if entry["steps"] is not None}
    fastest = min(hits, key=lambda name: (hits[name]["steps"], hits[name]["seconds"]), default=None)
    if not fastest:
        return None
    entry = hits[fastest]
    return {
        "scheduler": fastest,
        "steps": entry["steps"],
        "accuracy": entry["accuracy"],
        "seconds": entry["seconds"],
        "images_per_s": round(images / entry["seconds"], 2),
        "seconds_per_image": round(entry["seconds"] / images, 4),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
