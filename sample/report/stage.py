"""The report stage: one self-contained `report/index.html` for humans.

Everything is embedded (plots as base64 PNG made with matplotlib's Agg canvas, grids as
base64 PNG), so the file opens offline, can be mailed, and makes no network requests.
Missing inputs (no metrics yet, no validation) become a note in their section.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from matplotlib.figure import Figure

from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.credentials import redact
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("report")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; border: 1px solid #e5e5e5; }
.note { color: #777; font-style: italic; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.grids { display: flex; flex-wrap: wrap; gap: 1.2rem; }
figure { margin: 0; } figcaption { font-size: .88rem; color: #555; margin-top: .2rem; }
img.grid { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; }
.status-done { color: #1a7f37; } .status-failed { color: #cf222e; } .status-running, .status-partial { color: #9a6700; }
"""


# small HTML helpers -------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value))


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if is_number(c) else f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css_class: str = "") -> str:
    attributes = f' class="{css_class}"' if css_class else ""
    return f'<img{attributes} src="{data_uri(png)}" alt="{esc(alt)}">'


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def short(value: Any, limit: int = 16) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


# inputs ----------------------------------------------------------------------------------
def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    """train/metrics.jsonl as records; a torn last line (training still writing) is skipped."""
    if not run.exists(layout.TRAIN_METRICS):
        return []
    records = []
    for line in run.read_text(layout.TRAIN_METRICS).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def read_json_or_none(run: RunDir, relative: str) -> Any:
    return run.read_json(relative) if run.exists(relative) else None


# sections --------------------------------------------------------------------------------
def stages_section(run_manifest: dict[str, Any] | None) -> str:
    stages = (run_manifest or {}).get("stages", {})
    if not stages:
        return note(f"No {layout.RUN_MANIFEST} stages recorded yet.")
    order = [s for s in layout.STAGES if s in stages] + [s for s in stages if s not in layout.STAGES]
    rows = []
    for name in order:
        entry = stages[name]
        status = css_status = esc(entry.get("status", "?"))
        seconds = entry.get("seconds")
        details = {k: v for k, v in entry.items() if k not in HIDDEN_STAGE_FIELDS and v is not None}
        if name == "report" and status == "running":
            status = "writing this page"
        rows.append(
            f'<tr><td>{esc(name)}</td><td class="status-{css_status}">{status}</td>'
            f"<td>{esc(entry.get('started', ''))}</td><td>{esc(entry.get('finished', ''))}</td>"
            f'<td class="num">{esc(f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "")}</td>'
            f"<td>{format_details(details)}</td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in ("stage", "status", "started", "finished", "seconds", "details"))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


# Shown in their own columns, or too long for a table (the traceback stays in run.json).
HIDDEN_STAGE_FIELDS = ("status", "started", "finished", "seconds", "fingerprint", "traceback")


def format_details(details: dict[str, Any]) -> str:
    """Counts and other small fields of a stage entry, one `key: value` per line; nested dicts flattened."""
    lines = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list) and len(value) > 6:
            lines.append(f"{prefix}: [{len(value)} items]")
        else:
            lines.append(f"{prefix}: {short(value, 60)}")

    walk("", details)
    return "<br>".join(esc(line) for line in lines)


def line_plot(
    series: list[tuple[str | None, list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    size: tuple[float, float] = (5.2, 3.4),
    accuracy_axis: bool = False,
    **style: Any,
) -> bytes:
    """PNG of one or more (label, xs, ys) lines; labelled lines get a legend."""
    fig = Figure(figsize=size)
    axis = fig.add_subplot()
    for label, xs, ys in series:
        axis.plot(xs, ys, label=label, **style)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if accuracy_axis:
        axis.set_ylim(-0.02, 1.02)
    if any(label for label, _, _ in series):
        axis.legend(fontsize=8)
    return figure_png(fig)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


def loss_section(metrics: list[dict[str, Any]]) -> str:
    points = [(m["step"], m["loss"]) for m in metrics if isinstance(m.get("loss"), (int, float))]
    if not points:
        return note(f"No training metrics yet ({layout.TRAIN_METRICS}).")
    steps, losses = map(list, zip(*points))
    series = [("loss" if len(points) >= 20 else None, steps, losses)]
    if len(points) >= 20:  # a moving average makes the trend readable under per-step noise
        window = max(5, len(points) // 20)
        series.append((f"mean of {window}", steps, moving_average(losses, window)))
    plots = [img(line_plot(series, "step", "training loss", size=(6.4, 3.4)), "training loss over steps")]
    rates = [(m["step"], m["lr"]) for m in metrics if isinstance(m.get("lr"), (int, float))]
    if rates:
        steps, values = map(list, zip(*rates))
        plot = line_plot([(None, steps, values)], "step", "learning rate", size=(4.2, 3.4))
        plots.append(img(plot, "learning rate over steps"))
    last = metrics[-1]
    fields = ("step", "loss", "lr", "grad_norm", "samples_per_s")
    summary = ", ".join(f"{key} {short(last[key], 10)}" for key in fields if key in last)
    return f'<div class="plots">{"".join(plots)}</div><p>Last record: {esc(summary)}.</p>'


# judge metric -> (label, what it measures)
ACCURACY_METRICS = {
    "prompt_accuracy": (
        "prompt accuracy",
        (
            "Prompt accuracy: share of images (prompts x seeds) whose background and shape colours, snapped to the toy "
            "palette, are the prompt's."
        ),
    ),
    "shape_accuracy": (
        "shape accuracy",
        (
            "Shape accuracy: share of images (conditions x seeds) whose shape, read from which corners of its bounding box "
            "it fills, is the one asked for: the class's when the classes are toy shapes (class-conditional runs), "
            "else the prompt's."
        ),
    ),
}


def accuracy_section(validation: dict[str, Any] | None, metric: str = "prompt_accuracy") -> str:
    label, explanation = ACCURACY_METRICS[metric]
    checkpoints = (validation or {}).get("checkpoints", [])
    judged = [(c["step"], c["metrics"][metric]) for c in checkpoints if c.get("metrics", {}).get(metric)]
    labels = step_labels(checkpoints)
    if not judged:
        return note(f"No {label} metrics (no validated checkpoints yet, sample.judge = 'none', or nothing to judge).")
    keys = sorted({key for _, accuracy in judged for key in accuracy}, key=float)

    per_scale = []
    for key in keys:
        points = [(step, accuracy[key]) for step, accuracy in judged if key in accuracy]
        per_scale.append((f"guidance {key}", [p[0] for p in points], [p[1] for p in points]))
    plots = [img(line_plot(per_scale, "step", label, accuracy_axis=True, marker="o"), f"{label} vs step per guidance scale")]

    best = (validation or {}).get("best")
    last_step, _ = judged[-1]
    shown = {last_step: "last"}
    if best and any(step == best["step"] for step, _ in judged):
        shown[best["step"]] = "last, best" if best["step"] == last_step else "best"
    per_checkpoint = []
    for step, accuracy in judged:
        if step in shown:
            scales = sorted(accuracy, key=float)
            per_checkpoint.append((f"{shown[step]}: step {step}", [float(s) for s in scales], [accuracy[s] for s in scales]))
    plots.append(
        img(
            line_plot(per_checkpoint, "guidance scale", label, size=(4.6, 3.4), accuracy_axis=True, marker="o"),
            f"{label} vs guidance scale",
        )
    )

    rows = [[labels[step], *[f"{accuracy[k]:.3f}" if k in accuracy else "" for k in keys]] for step, accuracy in judged]
    best_line = ""
    if best and metric in best:
        scale, accuracy = best["guidance_scale"], best[metric]
        best_line = f"<p>Best: step {esc(best['step'])} at guidance {scale:g}, {label} {accuracy:.3f}.</p>"
    return (
        f'<div class="plots">{"".join(plots)}</div>{best_line}'
        + table(["step", *[f"guidance {k}" for k in keys]], rows)
        + note(explanation)
    )


# metric key -> (label, what it measures and which way is better)
OTHER_METRICS = {
    "clip_score": (
        "CLIP score",
        "CLIP score: 100 x max(cosine(image, prompt), 0) in CLIP's embedding space, averaged; higher is better.",
    ),
    "fid": (
        "FID",
        (
            "FID: Fréchet distance between Inception features of the validation images and of held-out images; lower "
            "is better. From a few dozen images it is biased upwards: compare checkpoints, not other papers."
        ),
    ),
}


def metrics_section(validation: dict[str, Any] | None) -> str:
    """CLIP score and FID over steps per guidance scale (when measured), and why a metric was skipped."""
    checkpoints = (validation or {}).get("checkpoints", [])
    parts = []
    for metric, (label, explanation) in OTHER_METRICS.items():
        measured = [(c["step"], c["metrics"][metric]) for c in checkpoints if c.get("metrics", {}).get(metric)]
        if not measured:
            continue
        keys = sorted({key for _, values in measured for key in values}, key=float)
        series = []
        for key in keys:
            points = [(step, values[key]) for step, values in measured if key in values]
            series.append((f"guidance {key}", [p[0] for p in points], [p[1] for p in points]))
        plot = img(line_plot(series, "step", label, marker="o"), f"{label} vs step per guidance scale")
        rows = [[step, *[f"{values[k]:.3f}" if k in values else "" for k in keys]] for step, values in measured]
        parts.append(
            f'<h3>{esc(label)}</h3><div class="plots">{plot}</div>'
            + table(["step", *[f"guidance {k}" for k in keys]], rows)
            + note(explanation)
        )
    skipped = checkpoints[-1].get("skipped_metrics", {}) if checkpoints else {}
    for metric, reason in skipped.items():
        parts.append(note(f"{OTHER_METRICS.get(metric, (metric,))[0]} skipped: {reason}"))
    if not parts:
        return note("No CLIP score or FID (no validated checkpoints yet).")
    return "".join(parts)


def step_labels(checkpoints: list[dict[str, Any]]) -> dict[int, int | str]:
    """Step -> how the report names it: '800 (128 px)' once checkpoints were sampled at several resolutions
    (a multi-resolution schedule, train.phases), so 64 px images are never compared with 128 px ones unlabelled."""
    several = len({entry["resolution"] for entry in checkpoints if entry.get("resolution")}) > 1
    return {
        entry["step"]: f"{entry['step']} ({entry['resolution']} px)" if several and entry.get("resolution") else entry["step"]
        for entry in checkpoints
    }


def grids_section(run: RunDir, validation: dict[str, Any] | None) -> str:
    checkpoints = (validation or {}).get("checkpoints", [])
    if not checkpoints:
        return note(f"No validated checkpoints yet ({layout.SAMPLE_VALIDATION}).")
    parts, labels = [], step_labels(checkpoints)
    for entry in reversed(checkpoints):  # newest first
        rows = f"{len(entry['conditions'])} conditions" if "conditions" in entry else f"{len(entry.get('prompts', []))} prompts"
        parts.append(
            f"<h3>Step {esc(labels[entry['step']])}</h3><p>{esc(entry.get('scheduler'))}, {esc(entry.get('steps'))} steps, "
            f"{rows} x seeds {esc(entry.get('seeds'))}, "
            f"validated in {esc(entry.get('seconds', '?'))} s{' while training ran' if entry.get('during_training') else ''}. "
            "Each block: the prompt (or class) above its images, one per seed.</p>"
        )
        figures = []
        for key, path in sorted(entry.get("images", {}).items(), key=lambda item: float(item[0])):
            caption = f"step {labels[entry['step']]}, guidance {key}"
            judged = [(label, entry.get("metrics", {}).get(metric, {})) for metric, (label, _) in ACCURACY_METRICS.items()]
            shown = ", ".join(f"{label} {values[key]:.3f}" for label, values in judged if key in values)
            caption += f": {shown}" if shown else ""
            for metric, (label, _) in OTHER_METRICS.items():
                if key in entry.get("metrics", {}).get(metric, {}):
                    caption += f", {label} {entry['metrics'][metric][key]:.2f}"
            if not run.exists(path):
                figures.append(f"<figure>{note(f'missing {path}')}<figcaption>{esc(caption)}</figcaption></figure>")
                continue
            picture = img(run.read_bytes(path), caption, "grid")
            figures.append(f"<figure>{picture}<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append(f'<div class="grids">{"".join(figures)}</div>')
    return "".join(parts)


def models_section(manifest: dict[str, Any] | None) -> str:
    if not manifest:
        return note(f"No encode manifest yet ({layout.ENCODE_MANIFEST}).")
    rows = []
    for kind in ("vae", "text_encoder", "tokenizer"):
        record = manifest.get(kind) or {}
        rows.append(
            [
                kind,
                record.get("id", ""),
                record.get("subfolder") or "",
                record.get("weights_sha256", ""),
                record.get("scaling_factor", ""),
            ]
        )
    shapes = [
        [key, json.dumps(manifest[key]) if not isinstance(manifest[key], str) else manifest[key]]
        for key in ("resolution", "dtype", "latent_shape", "text_embedding_shape", "count", "counts", "bytes_per_sample")
        if key in manifest
    ]
    models = table(["model", "id", "subfolder", "weights_sha256", "scaling_factor"], rows)
    return models + (table(["field", "value"], shapes) if shapes else "")


def config_section(run: RunDir) -> str:
    if not run.exists(layout.CONFIG):
        return note(f"No {layout.CONFIG} in the run directory.")
    return f"<pre>{esc(redact(run.read_text(layout.CONFIG)))}</pre>"  # a run made before url_list was checked


def render(config: PipelineConfig | None, run: RunDir) -> str:
    run_manifest = read_json_or_none(run, layout.RUN_MANIFEST)
    validation = read_json_or_none(run, layout.SAMPLE_VALIDATION)
    encode_manifest = read_json_or_none(run, layout.ENCODE_MANIFEST)
    metrics = read_metrics(run)
    sections = [
        ("Stages", stages_section(run_manifest)),
        ("Training loss", loss_section(metrics)),
        ("Prompt accuracy", accuracy_section(validation)),
        ("Shape accuracy", accuracy_section(validation, "shape_accuracy")),
        ("CLIP score and FID", metrics_section(validation)),
        ("Validation images", grids_section(run, validation)),
        ("Models", models_section(encode_manifest)),
        ("Config", config_section(run)),
    ]
    updated = (run_manifest or {}).get("updated", "")
    body = "".join(f"<h2>{esc(title)}</h2>{content}" for title, content in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Run report: {esc(run.url)}</title><style>{CSS}</style></head><body>"
        f"<h1>Run report</h1><p><code>{esc(run.url)}</code>{' — updated ' + esc(updated) if updated else ''}</p>"
        f"{body}</body></html>\n"
    )


def run_stage(config: PipelineConfig | None, run: RunDir) -> dict[str, Any]:
    text = render(config, run)
    run.write_text(layout.REPORT_INDEX, text)
    logger.info(f"wrote {run.path(layout.REPORT_INDEX)} ({len(text) / 1e6:.2f} MB)")
    return {"path": layout.REPORT_INDEX, "counts": {"bytes": len(text.encode("utf-8")), "images": text.count("<img ")}}
