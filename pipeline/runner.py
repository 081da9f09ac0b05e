"""Running stages in order against a run directory, skipping the ones already complete.

A stage's fingerprint hashes the config sections it reads and the fingerprint of the stage
before it, so a changed upstream stage makes every later one stale. A stage is skipped when
run.json says it is done with the same fingerprint. Otherwise it resumes (each stage resumes
what it can from its output folder) when its *base* fingerprint is unchanged: the same hash
without the keys that only say how far to go (`train.max_steps`, checkpoint cadence), chained
through the base fingerprints upstream; so raising max_steps continues training from the last
checkpoint and validates only the new exports. Any other change starts the stage over from an
empty output folder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
import traceback
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.table import Table

from pipeline import layout
from pipeline.config import PipelineConfig, to_toml
from pipeline.ray_runtime import ensure_ray
from pipeline.rundir import RunDir, now

console = Console(stderr=True)


class StageError(RuntimeError):
    """A stage failed; run.json records it as failed with the error."""


# Keys whose change extends a stage's work instead of invalidating it.
RESUMABLE_KEYS: dict[str, set[str]] = {
    "encode": {"batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "cpus_per_decode_task"},
    # How far to go and how to survive failures; not what is trained.
    "train": {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures", "max_nonfinite_streak"},
}

# name -> (entry point, config sections it reads, output folder, needs Ray)
STAGE_SPECS: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
    "ingest": ("ingest.stage:run_stage", ("seed", "ingest"), "ingest", True),
    "encode": ("ingest.encode:run_stage", ("encode",), "encode", True),
    "train": ("train.stage:run_stage", ("seed", "train"), "train", True),
    "sample": ("sample.validate:run_stage", ("sample",), "sample", False),
    "report": ("sample.report:run_stage", (), "report", False),
}
assert tuple(STAGE_SPECS) == layout.STAGES


def stage_function(name: str) -> Callable[[PipelineConfig, RunDir], dict[str, Any]]:
    module, function = STAGE_SPECS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def fingerprints(config: PipelineConfig) -> dict[str, tuple[str, str]]:
    """Stage -> (fingerprint, base fingerprint without its resumable keys), each chained."""
    data = config.model_dump(mode="json")
    chain: dict[str, tuple[str, str]] = {}
    previous, previous_base = "", ""
    for name, (_, sections, _, _) in STAGE_SPECS.items():
        payload = {section: data[section] for section in sections}
        base_payload = {
            section: {k: v for k, v in value.items() if k not in RESUMABLE_KEYS.get(section, ())}
            if isinstance(value, dict) else value
            for section, value in payload.items()
        }  # fmt: skip
        previous = _digest(payload, previous)
        previous_base = _digest(base_payload, previous_base)
        chain[name] = (previous, previous_base)
    return chain


def _digest(payload: dict, previous: str) -> str:
    return hashlib.sha256((json.dumps(payload, sort_keys=True) + previous).encode()).hexdigest()[:16]


def load_run_config(run: RunDir) -> PipelineConfig:
    from pipeline.config import ConfigError, validate

    if not run.exists(layout.CONFIG):
        raise ConfigError(f"{run.path(layout.CONFIG)} not found: is {run.url} a run directory? Start one with `pipeline run --out`.")
    import tomllib

    return validate(tomllib.loads(run.read_text(layout.CONFIG)))


def run_stages(config: PipelineConfig, run: RunDir, stages: Iterable[str] = layout.STAGES, force: bool = False) -> dict[str, Any]:
    """Run `stages` (in pipeline order); earlier stages must already be done."""
    wanted = [name for name in layout.STAGES if name in set(stages)]
    run.write_text(layout.CONFIG, to_toml(config))
    chain = fingerprints(config)
    for name in layout.STAGES:
        entry = run.stage(name)
        up_to_date = entry.get("status") == "done" and entry.get("fingerprint") == chain[name][0]
        if name not in wanted:
            if not up_to_date and any(layout.STAGES.index(w) > layout.STAGES.index(name) for w in wanted):
                raise StageError(f"stage {name!r} is not done for this config; run `pipeline {name} {run.url}` first")
            continue
        if up_to_date and not force:
            console.print(f"[green]skip[/] {name}: done at {entry.get('finished')} ({entry.get('seconds')} s)")
            continue
        _run_one(name, config, run, entry, chain[name], force)
    _print_summary(run)
    return run.manifest()


def _run_one(name: str, config: PipelineConfig, run: RunDir, entry: dict, stage_fingerprints: tuple[str, str], force: bool) -> None:
    _, _, output, needs_ray = STAGE_SPECS[name]
    fingerprint, base = stage_fingerprints
    resuming = entry.get("status") != "pending" and entry.get("base_fingerprint") == base and not force
    if not resuming:
        run.remove(output)  # stale or forced: start from an empty folder
    console.rule(f"[bold]{name}[/] ({'resume' if resuming else 'start'})")
    if needs_ray:
        ensure_ray(config.ray)
    started = time.monotonic()
    run.update_stage(name, status="running", started=now(), finished=None, fingerprint=fingerprint,
                     base_fingerprint=base, error=None)  # fmt: skip
    try:
        summary = stage_function(name)(config, run) or {}
    except BaseException as error:
        run.update_stage(name, status="failed", finished=now(), seconds=round(time.monotonic() - started, 2),
                         error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8))
        raise
    run.update_stage(name, **{**summary, "status": "done", "finished": now(), "seconds": round(time.monotonic() - started, 2)})


def _print_summary(run: RunDir) -> None:
    table = Table(title=f"run {run.url}")
    for column in ("stage", "status", "seconds", "counts"):
        table.add_column(column)
    for name in layout.STAGES:
        entry = run.stage(name)
        counts = ", ".join(f"{k}={v}" for k, v in (entry.get("counts") or {}).items())
        table.add_row(name, entry.get("status", "pending"), str(entry.get("seconds", "")), counts)
    console.print(table)
