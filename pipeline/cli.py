"""`pipeline`: run the whole pipeline or one stage against a run directory (any fsspec URL).

\b
pipeline run --preset tiny --out runs/demo     # every stage; rerun to resume or skip
pipeline encode runs/demo                      # one stage of an existing run
pipeline config show --preset sd15-256         # the resolved config
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import typer

from pipeline.core import layout
from pipeline.core.config import PRESET_ALIASES, PRESETS, ConfigError, load_config, to_toml
from pipeline.core.credentials import redact
from pipeline.core.ray_runtime import WORKER_ENV

for _key, _value in WORKER_ENV.items():
    os.environ.setdefault(_key, _value)

# Click's plain help: examples kept as written (\b), and a flag shown without a type (typer's rich panels
# rewrap the examples and show `--force <bool>`).
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.", rich_markup_mode=None)
app.add_typer(config_app, name="config")

PRESET_HELP = f"Preset: {' or '.join(PRESETS)} ({', '.join(f'{a} is short for {t}' for a, t in PRESET_ALIASES.items())})."
PresetOption = typer.Option(None, "--preset", "-p", metavar="NAME", help=PRESET_HELP)
ConfigOption = typer.Option(None, "--config", "-c", metavar="FILE", help="TOML file merged over the preset.")
SetOption = typer.Option(
    [], "--set", "-s", metavar="KEY=VALUE", help="Override a key, e.g. train.max_steps=200 or sample.seeds=[0,1] (repeatable)."
)
ForceOption = typer.Option(
    False, "--force", help="Rerun every stage from scratch, even if done; old outputs are moved aside (STAGE.superseded-TIME/)."
)
RestartOption = typer.Option(
    None,
    "--restart",
    metavar="STAGE",
    help="Start STAGE and the later stages over (after a config change), moving their old outputs aside.",
)
VerboseOption = typer.Option(False, "--verbose", "-v", help="Show Ray's and the libraries' own output on the console too.")
PromptOption = typer.Option(
    [], "--prompt", metavar="TEXT", help="Sample these prompts into --out instead of validating (repeatable)."
)
SeedOption = typer.Option([], "--seed", metavar="N", help="One image per seed (repeatable); default 0.")
ClassOption = typer.Option(
    [], "--class", metavar="NAME", help="Sample this class of a class-conditional run (repeatable; with --prompt: every pair)."
)


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _output_folder(option: str, path: str):
    """Make the folder `path` and write a file in it now, so that a bad location fails before any work in one
    line naming `option`; the folders made here are removed again, if still empty, when the work fails."""
    folder = Path(path)
    made = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        _fail(f"{option} {path}: {error.strerror or error}")
    try:
        yield
    except BaseException:
        for parent in made:  # the deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _whole_number(text: str) -> int:
    """An integer option that also takes 1e8 or 100_000_000 (a float only when it is a whole number)."""
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        number = float(text)
        if number.is_integer():
            return int(number)
    raise typer.BadParameter(f"{text!r} is not a whole number")


def _command_line() -> str:
    """This command, for the run's lease (what another driver's refusal names); --set values cut short."""
    text = redact(" ".join(["pipeline", *sys.argv[1:]]))  # no URL credential in the lease
    return text if len(text) <= 300 else text[:297] + "..."


def _start_log(run_dir, verbose: bool) -> None:
    """The console and the log file: RUN/logs/console.log for a local run, a local temporary file otherwise."""
    from pipeline.core import log

    log.setup_driver(Path(run_dir.root) / layout.LOGS / log.LOG_FILE if run_dir.is_local else None, verbose)


@app.command(short_help="Run every stage; skip what is done, resume the rest.")
def run(
    out: str = typer.Option(..., "--out", "-o", metavar="RUN", help="Run directory: local path or fsspec URL (s3://...)."),
    preset: str | None = PresetOption,
    config: str | None = ConfigOption,
    overrides: list[str] = SetOption,
    force: bool = ForceOption,
    restart: str | None = RestartOption,
    verbose: bool = VerboseOption,
) -> None:
    """Run every stage; a finished run is skipped and a half-finished one resumed."""
    from pipeline.core.rundir import RunDir
    from pipeline.runner import StageError, load_run_config, run_stages

    run_dir = RunDir(out)
    _start_log(run_dir, verbose)
    try:
        if preset or config or overrides or not run_dir.exists(layout.CONFIG):
            resolved = load_config(preset, config, overrides)
        else:
            resolved = load_run_config(run_dir)  # rerun of an existing run: keep its config
        run_stages(resolved, run_dir, force=force, restart=restart, command=_command_line())
    except (ConfigError, StageError) as error:
        _fail(str(error))


def _stage_command(name: str):
    def command(
        run_url: str = typer.Argument(..., metavar="RUN", help="An existing run directory."),
        force: bool = ForceOption,
        verbose: bool = VerboseOption,
    ) -> None:
        from pipeline.core.rundir import RunDir
        from pipeline.runner import StageError, load_run_config, run_stages

        run_dir = RunDir(run_url)
        _start_log(run_dir, verbose)
        try:
            run_stages(load_run_config(run_dir), run_dir, stages=[name], force=force, command=_command_line())
        except (ConfigError, StageError) as error:
            _fail(str(error))

    command.__doc__ = f"Run the {name} stage against an existing run directory."
    return command


for _name in layout.STAGES:
    if _name != "sample":
        app.command(name=_name)(_stage_command(_name))


@app.command(name="sample", short_help="Validate every export, or write PNGs of --prompt/--class.")
def sample(
    run_url: str = typer.Argument(..., metavar="RUN", help="An existing run directory."),
    prompts: list[str] = PromptOption,
    class_names: list[str] = ClassOption,
    out: str | None = typer.Option(None, "--out", "-o", metavar="DIR", help="Folder for the PNGs (with --prompt)."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="Default: the empty caption training dropped to."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Default: sample.steps of the run's config."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="ddpm, ddim, dpmsolver++ or euler; default: sample.scheduler."
    ),
    seeds: list[int] = SeedOption,
    checkpoint: int | None = typer.Option(None, "--checkpoint", help="Exported step; default: the latest."),
    force: bool = ForceOption,
    verbose: bool = VerboseOption,
) -> None:
    """Validate every exported checkpoint (the sample stage), or with --prompt (or --class) write PNGs of one."""
    if not prompts and not class_names:
        if out or negative_prompt is not None or steps or scheduler or seeds or checkpoint is not None:
            _fail("--out, --negative-prompt, --steps, --scheduler, --seed and --checkpoint go with --prompt or --class")
        return _stage_command("sample")(run_url, force, verbose)
    from pipeline.core.rundir import RunDir
    from pipeline.runner import load_run_config

    if not out:
        _fail("--prompt needs --out DIR for the PNGs (as --class does)")
    run_dir = RunDir(run_url)
    _start_log(run_dir, verbose)  # first: it quiets the libraries imported next (their load bars)
    with _output_folder("--out", out):  # a bad --out fails here, before anything is loaded or sampled
        from sample.generate import sample_command
        from sample.guidance import SCHEDULERS, Sampling

        try:
            config = load_run_config(run_dir)
        except ConfigError as error:
            _fail(str(error))
        scheduler = scheduler or config.sample.scheduler
        if scheduler not in SCHEDULERS:
            _fail(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        try:
            sampling = Sampling(
                guidance_scale=guidance,
                seeds=seeds or [0],
                steps=steps or config.sample.steps,
                scheduler=scheduler,
                timestep_spacing=config.sample.timestep_spacing,
                batch_size=config.sample.batch_size,
                guidance_rescale=config.sample.guidance_rescale,
            )
            paths = sample_command(run_dir, config, prompts, out, sampling, negative_prompt, checkpoint, class_names)
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
    for path in paths:
        typer.echo(str(path))


BENCHES = {
    "ingest": "pipeline.bench.ingest:run_bench",
    "encode": "pipeline.bench.encode:run_bench",
    "train": "pipeline.bench.train:run_bench",
    "lora": "pipeline.bench.lora:run_bench",
    "readers": "pipeline.bench.readers:run_bench",
    "scale-train": "pipeline.bench.scale_train:run_bench",
    "scale-ingest": "pipeline.bench.scale_ingest:run_bench",
    "sample": "pipeline.bench.sample:run_bench",
    "gpu": "pipeline.bench.gpu:run_bench",
}


@app.command(short_help="Measure a stage against a bare baseline.")
def bench(
    name: str = typer.Argument(..., help=f"Which bench: {', '.join(BENCHES)}."),
    images: int | None = typer.Option(None, help="Images the bench downloads or encodes (default: the bench's own)."),
    cpus: int = typer.Option(2, help="CPUs of the private Ray instance."),
    run_url: str | None = typer.Option(
        None, "--run", metavar="RUN", help="Run directory the bench reads (sample: default runs/demo)."
    ),
    tiny: bool = typer.Option(False, "--tiny", help="gpu: tiny shapes that run on a CPU, instead of SD-1.5 at 256 px."),
) -> None:
    """Measure a stage against a bare baseline in the same run; the last line is one JSON object."""
    import importlib
    import inspect
    import json

    if name not in BENCHES:
        _fail(f"unknown bench {name!r}; choose one of {', '.join(BENCHES)}")
    from pipeline.core import log

    log.setup_driver()
    module, function_name = BENCHES[name].split(":")
    function = getattr(importlib.import_module(module), function_name)
    options = {key: value for key, value in {"images": images, "run": run_url, "tiny": tiny or None}.items() if value is not None}
    unknown = sorted(set(options) - set(inspect.signature(function).parameters))
    if unknown:
        _fail(f"bench {name} takes no --{', --'.join(unknown)}")
    try:
        result = function(cpus=cpus, **options)
    except FileNotFoundError as error:
        _fail(str(error))
    typer.echo(json.dumps(result))


@app.command(short_help="Estimate the time, storage and cost of a run.")
def plan(
    images: int = typer.Option(..., "--images", metavar="N", parser=_whole_number, help="Images (URLs) in the run, e.g. 1e8."),
    preset: str = typer.Option(
        "sd15-256", "--preset", "-p", metavar="NAME", help=f"{PRESET_HELP[:-1]}: model shapes, steps and batch."
    ),
    resolution: int | None = typer.Option(None, "--resolution", help="Side in px; default: the preset's encode.resolution."),
    gpu: str | None = typer.Option(None, "--gpu", help="A100-40GB, A100-80GB, H100, L4 or CPU; default: by train.use_gpu."),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs (CPU: nodes) in all; default: train.num_workers."),
    encode_actors: int | None = typer.Option(
        None, "--encode-actors", metavar="N", parser=_whole_number, help="Encoder actors; default: encode.num_actors."
    ),
    nodes: int | None = typer.Option(None, "--nodes", help="Nodes that download; default: GPUs / GPUs per node."),
    network_gbps: float = typer.Option(10.0, "--network-gbps", help="Network per node, Gbit/s."),
    price: float | None = typer.Option(None, "--price-per-gpu-hour", help="USD; default: the GPU's AWS on-demand price."),
    epochs: float | None = typer.Option(None, "--epochs", help="Train this many passes (instead of steps)."),
    steps: int | None = typer.Option(
        None, "--steps", metavar="N", parser=_whole_number, help="Optimizer steps; default: train.max_steps."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", metavar="N", parser=_whole_number, help="Global batch; default: the preset's."
    ),
    mfu: float | None = typer.Option(None, "--mfu", help="Achieved fraction of peak FLOP/s, encode and train."),
    download_rate: float | None = typer.Option(None, "--download-rate", help="Images/s per node."),
    raw_bytes: float | None = typer.Option(None, "--raw-bytes-per-image", help="Raw shard bytes per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
) -> None:
    """Estimate download, encode and train time, storage and cost, printing every assumption and its source."""
    import json

    from pipeline import plan as planning

    try:
        inputs = planning.PlanInputs(
            images=images,
            preset=planning.preset_facts(preset),
            gpu=gpu,
            gpus=gpus,
            encode_actors=encode_actors,
            resolution=resolution,
            nodes=nodes,
            network_gbps=network_gbps,
            price_per_gpu_hour=price,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            mfu=mfu,
            download_rate=download_rate,
            raw_bytes_per_image=raw_bytes,
        )
        result = planning.plan(inputs)
    except planning.PlanError as error:
        _fail(str(error))
    typer.echo(json.dumps(result) if as_json else planning.render(result))


@config_app.command("show")
def config_show(
    preset: str | None = PresetOption,
    config: str | None = ConfigOption,
    overrides: list[str] = SetOption,
    explain: bool = typer.Option(False, "--explain", help="Each key's description as a comment above it."),
) -> None:
    """Print the resolved config as TOML, every default written out."""
    try:
        typer.echo(to_toml(load_config(preset, config, overrides), explain=explain), nl=False)
    except ConfigError as error:
        _fail(str(error))


def main() -> None:
    """The `pipeline` command. A usage mistake (an unknown option, a value of the wrong type) is one line, as every
    other expected mistake is, not click's usage block."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer's own click

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as error:  # `pipeline config`: the help, as before
        error.show()
        code = 2
    except UsageError as error:
        where = f" (see {error.ctx.command_path} --help)" if error.ctx else ""
        typer.secho(f"{error.format_message()}{where}", fg=typer.colors.RED, err=True)
        code = 2
    except ClickException as error:
        error.show()
        code = error.exit_code
    except (typer.Abort, KeyboardInterrupt):  # as click's standalone mode says it
        typer.echo("Aborted!", err=True)
        code = 1
    sys.exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
