"""Running stages in order against a run directory, skipping the ones already complete.

A stage's fingerprint hashes the config sections it reads and the fingerprint of the stage
before it, so a changed upstream stage makes every later one stale. A stage is skipped when
run.json says it is done with the same fingerprint. Otherwise it resumes (each stage resumes
what it can from its output folder) when its *base* fingerprint is unchanged: the same hash
without the keys that only say how far to go (`train.max_steps`, checkpoint cadence), chained
through the base fingerprints upstream; so raising max_steps continues training from the last
checkpoint and validates only the new exports. A third, *phase* fingerprint also leaves out
PHASE_KEYS (encode.resolution, encode.buckets): when only they differ, the stage keeps its output and starts a new
phase of the same run (a multi-resolution schedule): encode re-encodes the images but reuses the
text embeddings (`ingest.encode.reuse`), train continues from its last checkpoint at the new resolution
(`train.phases`), sample keeps what it validated.

Any other change would start the stage over, and a stage never starts over on the outputs it holds
unasked: the run is refused before anything runs, with the keys that changed (old -> new). Asked
(`--restart STAGE` for that stage and the later ones, `--force` for all), the old folder is moved aside
within the run (`train.superseded-<time>/`), never deleted. One driver at a time holds the run
(pipeline.core.lease).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import json
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.core import layout, log, resources
from pipeline.core.config import ConfigError, PipelineConfig, to_toml, validate
from pipeline.core.errors import StageFailure
from pipeline.core.lease import Lease, LeaseHeld
from pipeline.core.log import get_logger
from pipeline.core.ray_runtime import ensure_ray
from pipeline.core.rundir import RunDir, now


class StageError(RuntimeError):
    """A stage failed; run.json records it as failed with the error."""


# Errors of the output location itself (full, read-only, not permitted, not a folder): one line
# naming the path is all a user needs, not a traceback from deep in a library.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}
# Creating the run directory: also a parent that cannot be made (--out /proc/x). Not for a stage's errors,
# where a missing file is more often an input than the output location.
RUN_DIR_ERRNOS = STORAGE_ERRNOS | {errno.ENOENT}


def storage_error(error: BaseException | None, errnos: set[int] = STORAGE_ERRNOS) -> OSError | None:
    """The innermost OSError of `errnos` behind `error` (through `raise ... from` and Ray's
    `cause`: Ray's wrappers pose as OSErrors too, with their own text as the file name), or None."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in errnos:
            found = error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__ or error.__context__
    return found


# Keys whose change extends a stage's work instead of invalidating it.
RESUMABLE_KEYS: dict[str, set[str]] = {
    "encode": {"batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "cpus_per_decode_task"},
    # How far to go and how to survive failures; not what is trained.
    # ... and where: a checkpoint resumes on another number of workers (train.checkpoint.make_universal).
    "train": {
        "max_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "max_failures",
        "max_nonfinite_streak",
        "num_workers",
        "cpus_per_worker",
        "threads_per_worker",
        "placement_strategy",
        "record_samples",
        "profile",
        # Where metrics go, not what is trained: a tracker added to a run logs from its next step on.
        "trackers",
        "tracker_project",
    },
}

# Keys whose change upstream starts a new phase of the same run instead of a new run: train at 256 px, then go on
# at 512 px from the same checkpoint (MosaicML's SD2 recipe). Only the sizes (the resolution and the buckets,
# which "auto" derives from it): anything else that changes what the latents hold makes a new run.
PHASE_KEYS: dict[str, set[str]] = {"encode": {"resolution", "buckets"}}


@dataclass(frozen=True)
class StageSpec:
    """Where a stage lives and what it reads and writes."""

    package: str  # holds stage.py with run_stage(config, run) -> summary
    sections: tuple[str, ...]  # config sections its fingerprint hashes
    output: str  # its folder in the run directory
    needs_ray: bool
    # Raised when the stage's outputs change in a way later stages need (encode 2: the manifest's
    # latent_shards; 3: one latent shard per raw shard; ingest 2: a raw shard is complete once its
    # outcome record, written after its tar is checked against its stats, exists). In the full
    # fingerprint only: an older run's stage resumes, which brings its outputs up to date.
    version: int = 1


STAGE_SPECS: dict[str, StageSpec] = {
    "ingest": StageSpec("ingest.download", ("seed", "ingest"), "ingest", needs_ray=True, version=2),
    "encode": StageSpec("ingest.encode", ("encode",), "encode", needs_ray=True, version=3),
    "train": StageSpec("train", ("seed", "train"), "train", needs_ray=True),
    "sample": StageSpec("sample.validate", ("sample",), "sample", needs_ray=False),
    "report": StageSpec("sample.report", (), "report", needs_ray=False),
}
assert tuple(STAGE_SPECS) == layout.STAGES


def stage_function(name: str) -> Callable[[PipelineConfig, RunDir], dict[str, Any]]:
    return importlib.import_module(f"{STAGE_SPECS[name].package}.stage").run_stage


# Keys added with a default that keeps the old behaviour: left out of fingerprints at that default,
# as unset optional keys are, so runs made before the key existed stay valid.
NEUTRAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "conditioning": "text",
        "record_samples": False,
        "profile": False,
        "placement_strategy": "PACK",
        "rescale_betas_zero_snr": False,
        "lora_fuse_export": False,
        "trackers": ["tensorboard"],
        "tracker_project": "t2i-pipeline",
    }
}


def fingerprints(config: PipelineConfig) -> dict[str, tuple[str, str]]:
    """Stage -> (fingerprint, base fingerprint without its resumable keys), each chained."""
    return {
        name: (fingerprint, base)
        for (name, fingerprint), base in zip(_chain(config, {}, versions=True).items(), _chain(config, RESUMABLE_KEYS).values())
    }


def phase_fingerprints(config: PipelineConfig) -> dict[str, str]:
    """Stage -> the base fingerprint that also leaves out PHASE_KEYS, chained: equal when only those changed."""
    ignored = {section: RESUMABLE_KEYS.get(section, set()) | PHASE_KEYS.get(section, set()) for section in STAGE_SPECS}
    return _chain(config, ignored)


def continuation(entry: dict, base: str, phase: str, force: bool = False) -> str:
    """How a stage that is not up to date runs against what its run.json `entry` says it did last:
    'resume' (only resumable keys changed), 'new phase' (also PHASE_KEYS upstream) or 'start' over."""
    if force or entry.get("status", "pending") == "pending":
        return "start"
    if entry.get("base_fingerprint") == base:
        return "resume"
    return "new phase" if entry.get("phase_fingerprint") == phase else "start"


def _chain(config: PipelineConfig, ignored: dict[str, set[str]], versions: bool = False) -> dict[str, str]:
    """Stage -> the chained hash of the config sections it reads, without the `ignored` keys of each section
    (and with `versions`, the stage's output version where it is above 1)."""
    data = _fingerprinted(config)
    chain: dict[str, str] = {}
    previous = ""
    for name, spec in STAGE_SPECS.items():
        payload = {
            section: {k: v for k, v in data[section].items() if k not in ignored.get(section, ())}
            if isinstance(data[section], dict)
            else data[section]
            for section in spec.sections
        }
        if name == "train" and config.train.init_from:  # the init model's weights, not only its name
            from train.finetune import init_fingerprint

            payload["init_sha256"] = init_fingerprint(config.train)
        if versions and spec.version > 1:
            payload["output_version"] = spec.version
        previous = _digest(payload, previous)
        chain[name] = previous
    return chain


def _fingerprinted(config: PipelineConfig) -> dict[str, Any]:
    """The config as fingerprints see it: without keys left unset or at a NEUTRAL_DEFAULTS value."""
    data = _without_unset(config.model_dump(mode="json"))
    for section, defaults in NEUTRAL_DEFAULTS.items():
        data[section] = {k: v for k, v in data[section].items() if k not in defaults or defaults[k] != v}
    return data


def _without_unset(value: Any) -> Any:
    """Drop keys left unset (None, [] or {}), so adding an optional key keeps existing runs' fingerprints."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None and v != [] and v != {}}
    return value


def _digest(payload: dict, previous: str) -> str:
    return hashlib.sha256((json.dumps(payload, sort_keys=True) + previous).encode()).hexdigest()[:16]


def load_run_config(run: RunDir) -> PipelineConfig:
    """The config a run directory was made with (its config.toml)."""
    if not run.exists(layout.CONFIG):
        raise ConfigError(
            f"{run.path(layout.CONFIG)} not found: is {run.url} a run directory? Start one with `pipeline run --out`."
        )
    return validate(tomllib.loads(run.read_text(layout.CONFIG)))


@dataclass(frozen=True)
class Plan:
    """What one call of run_stages runs: the stages asked for, each stage's fingerprints and whether
    it starts over if it must (`--force`, or at or after `--restart`)."""

    wanted: list[str]
    chain: dict[str, tuple[str, str]]  # stage -> (fingerprint, base fingerprint)
    phases: dict[str, str]  # stage -> phase fingerprint
    forced: dict[str, bool]

    def up_to_date(self, name: str, entry: dict) -> bool:
        return entry.get("status") == "done" and entry.get("fingerprint") == self.chain[name][0]


def run_stages(
    config: PipelineConfig,
    run: RunDir,
    stages: Iterable[str] = layout.STAGES,
    force: bool = False,
    restart: str | None = None,
    command: str = "pipeline",
) -> dict[str, Any]:
    """Run `stages` (in pipeline order); earlier stages must already be done. `force` reruns every one
    of them from scratch, `restart` that stage and the later ones (their old outputs are moved aside)."""
    if restart is not None and restart not in layout.STAGES:
        raise StageError(f"--restart {restart!r}: choose one of {', '.join(layout.STAGES)}")
    plan = Plan(
        wanted=[name for name in layout.STAGES if name in set(stages)],
        chain=fingerprints(config),
        phases=phase_fingerprints(config),
        forced={
            name: force or (restart is not None and layout.STAGES.index(name) >= layout.STAGES.index(restart))
            for name in layout.STAGES
        },
    )
    try:
        refuse_starting_over(config, run, plan)
        lease = Lease(run, command).acquire()
        try:
            run.write_text(layout.CONFIG, to_toml(config))
        except BaseException:
            lease.release()
            raise
    except LeaseHeld as error:
        raise StageError(str(error)) from error
    except OSError as error:
        if storage_error(error, RUN_DIR_ERRNOS) is None:
            raise
        raise StageError(f"cannot write the run directory {run.url}: {error.strerror or error}") from error
    try:
        _run_planned(config, run, plan)
    finally:
        lease.release()
    _print_summary(run)
    return run.manifest()


def _run_planned(config: PipelineConfig, run: RunDir, plan: Plan) -> None:
    if log.log_file():
        log.get_logger("run").info(f"{run.url}; full log in {log.log_file()}")
    on_ray = [
        name
        for name in plan.wanted
        if STAGE_SPECS[name].needs_ray and (plan.forced[name] or not plan.up_to_date(name, run.stage(name)))
    ]
    if on_ray:  # every stage's request, before the first starts: not a day of encoding, then a refused train
        ensure_ray(config.ray)
        refuse_unfit(config, on_ray, before_any=True)
    watched = False
    for name in layout.STAGES:
        entry = run.stage(name)
        up_to_date = plan.up_to_date(name, entry)
        if name not in plan.wanted:
            if not up_to_date and any(layout.STAGES.index(w) > layout.STAGES.index(name) for w in plan.wanted):
                raise StageError(f"stage {name!r} is not done for this config; run `pipeline {name} {run.url}` first")
            continue
        if up_to_date and not plan.forced[name]:
            get_logger(name).info(f"skipped: done at {entry.get('finished')} ({entry.get('seconds')} s)")
            continue
        beside = None
        validates = bool(config.sample.prompts) or config.train.conditioning == "class"  # sample.validate.has_conditions
        if name == "train" and "sample" in plan.wanted and config.sample.watch and validates:
            sample_fingerprints = (*plan.chain["sample"], plan.phases["sample"])
            beside = functools.partial(_sample_watcher, config, run, sample_fingerprints, plan.forced["sample"])
            watched = True
        # What the watcher validated for this training stays, even under force.
        force = plan.forced[name] and not (name == "sample" and watched)
        _run_one(name, config, run, entry, (*plan.chain[name], plan.phases[name]), force, beside)


def refuse_starting_over(config: PipelineConfig, run: RunDir, plan: Plan) -> None:
    """StageError, before anything runs or is written, if a wanted stage would start over on outputs it
    holds without being asked to (`plan.forced`): the message names the keys that changed and the ways out."""
    blocked, entries = [], run.manifest()["stages"]
    for name in plan.wanted:
        entry = entries.get(name, {"status": "pending"})
        if (
            plan.forced[name]
            or plan.up_to_date(name, entry)
            or continuation(entry, plan.chain[name][1], plan.phases[name]) != "start"
        ):
            continue
        if name != "report" and run.list(STAGE_SPECS[name].output):  # the report is rebuilt from the rest
            blocked.append(name)
    if not blocked:
        return
    first = blocked[0]
    changes = changed_keys(previous_config(run), config, first)
    why = (
        "its config changed:\n" + "\n".join(f"  {change}" for change in changes)
        if changes
        else "run.json records it under another config (an earlier stage's, or train.init_from's weights)"
    )
    held = ", ".join(f"{run.path(STAGE_SPECS[name].output)}/" for name in blocked)
    raise StageError(
        f"stage {first!r} would start over on the finished work in {held}; "
        f"{why}\nNothing was changed. Either keep this run and start the new config elsewhere with another --out, "
        f"or pass --restart {first} (or --force) to move {run.path(STAGE_SPECS[first].output)}/ aside to "
        f"{run.path(layout.superseded_name(STAGE_SPECS[first].output, '<time>'))}/ (and each later stage's folder likewise) "
        "and start over."
    )


def previous_config(run: RunDir) -> PipelineConfig | None:
    """The config the run holds (config.toml), or None if it has none or it no longer validates."""
    try:
        return load_run_config(run)
    except (ConfigError, ValueError, OSError):
        return None


def changed_keys(before: PipelineConfig | None, after: PipelineConfig, stage: str) -> list[str]:
    """'section.key: old -> new' for each key a stage's fingerprint (chained: its sections and every
    earlier stage's) reads that differs, leaving out the resumable ones."""
    if before is None:
        return []
    sections = [section for name in layout.STAGES[: layout.STAGES.index(stage) + 1] for section in STAGE_SPECS[name].sections]
    old, new = _fingerprinted(before), _fingerprinted(after)
    changes = []
    for section in dict.fromkeys(sections):
        a, b = _flat(old.get(section), section), _flat(new.get(section), section)
        resumable = {f"{section}.{key}" for key in RESUMABLE_KEYS.get(section, ())}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) and ".".join(key.split(".")[:2]) not in resumable:  # section.key of a table's key
                changes.append(f"{key}: {_shown(a.get(key))} -> {_shown(b.get(key))}")
    return changes


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value} if value is not None else {}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}"))
    return flat


def _shown(value: Any) -> str:
    text = "(unset)" if value is None else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def set_aside(run: RunDir, name: str) -> str | None:
    """Move a stage's folder aside within the run (train -> train.superseded-<UTC time>), recorded in
    run.json; its new name, or None when it held nothing."""
    output = STAGE_SPECS[name].output
    if name == "report" or not run.list(output):
        run.remove(output)  # rebuilt from the rest; or nothing finished, at most a killed write's temporary files
        return None
    aside = layout.superseded_name(output, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    while run.exists(aside):  # two in one second
        aside += "x"
    run.move(output, aside)
    manifest = run.manifest()
    superseded = manifest.setdefault("superseded", [])
    superseded.append({"stage": name, "folder": aside, "at": now(), "fingerprint": run.stage(name).get("fingerprint")})
    run.write_json(layout.RUN_MANIFEST, manifest)
    get_logger(name).warning(
        f"moved the old {run.path(output)}/ aside to {run.path(aside)}/ (delete it once you no longer need it)"
    )
    return aside


def _run_one(
    name: str,
    config: PipelineConfig,
    run: RunDir,
    entry: dict,
    stage_fingerprints: tuple[str, str, str],
    force: bool,
    beside: Callable[[bool], contextlib.AbstractContextManager] | None = None,
) -> None:
    """`beside(keeps_output)`, if given, is a context the stage function runs inside (the sample watcher)."""
    needs_ray = STAGE_SPECS[name].needs_ray
    _, base, phase = stage_fingerprints
    mode = continuation(entry, base, phase, force)
    if mode == "start":
        set_aside(run, name)  # stale and asked for, or forced: start from an empty folder, the old one kept
    logger = get_logger(name)
    logger.info(f"start ({mode})")
    if needs_ray:
        ensure_ray(config.ray)
        refuse_unfit(config, [name], before_any=False)  # again: nodes may have gone since the run started
    started = time.monotonic()
    _mark_running(run, name, stage_fingerprints)
    try:
        function = stage_function(name)  # imported before a watcher thread imports too: diffusers' lazy imports race
        with beside(mode != "start") if beside else contextlib.nullcontext():
            summary = function(config, run) or {}
    except BaseException as error:
        _record_failure(name, run, error, round(time.monotonic() - started, 2))
        if isinstance(error, StageFailure):  # expected, and its message says it all: one line, no traceback
            raise StageError(f"stage {name!r} failed: {error}") from error
        raise
    seconds = round(time.monotonic() - started, 2)
    run.update_stage(name, **{**summary, "status": "done", "finished": now(), "seconds": seconds})
    counts = ", ".join(f"{key} {value}" for key, value in (summary.get("counts") or {}).items())
    logger.info(f"done in {seconds:.1f} s" + (f": {counts}" if counts else ""))


def refuse_unfit(config: PipelineConfig, names: list[str], before_any: bool) -> None:
    """StageError naming the keys and numbers where a stage of `names` asks Ray for more than the cluster has or
    its autoscaler can add (pipeline.core.resources): Ray would wait for it forever. `before_any`: no stage of
    this call has run yet (else only the stage about to start is held back)."""
    if not config.ray.check_resources:
        return
    cluster = resources.current_cluster()
    if cluster is None:
        if before_any:  # said once per run
            get_logger("run").warning(
                "an autoscaler runs but reported no maximum to Ray: whether "
                + ", ".join(names)
                + " can get the resources it asks for is not checked"
            )
        return
    reasons = [reason for name in names if (reason := resources.unfit(name, config, cluster))]
    if reasons:
        held = "Nothing was started" if before_any else f"Stage {names[0]!r} was not started"
        raise StageError(
            f"{'; '.join(reasons)}. {held} (where an autoscaler Ray does not know of adds nodes, --set ray.check_resources=false)"
        )


def _mark_running(run: RunDir, name: str, stage_fingerprints: tuple[str, str, str]) -> None:
    """run.json: the stage is running, with the fingerprints (full, base, phase) of the config it runs."""
    fingerprint, base, phase = stage_fingerprints
    run.update_stage(
        name,
        status="running",
        started=now(),
        finished=None,
        fingerprint=fingerprint,
        base_fingerprint=base,
        phase_fingerprint=phase,
        error=None,
    )


def _record_failure(name: str, run: RunDir, error: BaseException, seconds: float) -> None:
    """Record a failed stage in run.json. An error of the output location itself (full, read-only: STORAGE_ERRNOS)
    becomes a StageError of one line naming the path, raised from `error`; others are recorded and left to propagate."""
    storage = storage_error(error)
    if storage is None:
        run.update_stage(
            name,
            status="failed",
            finished=now(),
            seconds=seconds,
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(limit=8),
        )
        return
    # Ray Data rebuilds the error with its own text where the file name goes: not a path.
    path = storage.filename if str(storage.filename).startswith("/") or "://" in str(storage.filename) else None
    message = f"stage {name!r} failed on {path or run.path(STAGE_SPECS[name].output)}: {storage.strerror or storage}"
    try:  # on a full disk, run.json may not take it either
        run.update_stage(
            name, status="failed", finished=now(), seconds=seconds, error=message, traceback=traceback.format_exc(limit=8)
        )
    except OSError as also:
        message += f" (nor could {run.path(layout.RUN_MANIFEST)} record it: {also.strerror or also})"
    raise StageError(message) from error


@contextlib.contextmanager
def _sample_watcher(
    config: PipelineConfig, run: RunDir, sample_fingerprints: tuple[str, str, str], force: bool, train_keeps_output: bool
):
    """sample.watch: validate exports while training runs (sample.watch.Watcher), stopped and joined before
    the sample stage. sample/ is first kept or emptied as the sample stage would (emptied too when training
    starts over), and the stage's entry then says the stage resumes it. A watcher whose reservation does not fit
    beside training's (sample.watch.crowded_out) is not started: the stage then validates every export."""
    import ray

    from sample.watch import Watcher, crowded_out

    _, base, phase = sample_fingerprints
    if not train_keeps_output or continuation(run.stage("sample"), base, phase, force) == "start":
        set_aside(run, "sample")
    _mark_running(run, "sample", sample_fingerprints)
    # Without Ray (tests) the watcher validates in this process and reserves nothing.
    crowded = crowded_out(config, ray.cluster_resources()) if ray.is_initialized() else None
    if crowded:
        get_logger("watch").warning(
            f"validation watcher not started: {crowded}; every export is validated after training instead"
        )
        run.update_stage("sample", status="partial", watch={"started": False, "reason": crowded, "validated": [], "errors": {}})
        yield
        return
    watcher = Watcher(config, run).start()
    try:
        yield
    finally:
        run.update_stage("sample", status="partial", watch={"started": True, **watcher.stop()})


def _print_summary(run: RunDir) -> None:
    table = Table(title=f"run {run.url}")
    for column in ("stage", "status", "seconds", "counts"):
        table.add_column(column)
    for name in layout.STAGES:
        entry = run.stage(name)
        counts = ", ".join(f"{k}={v}" for k, v in (entry.get("counts") or {}).items())
        table.add_row(name, entry.get("status", "pending"), str(entry.get("seconds", "")), counts)
    Console(stderr=True).print(table)
