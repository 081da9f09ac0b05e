"""One log for the driver and every Ray worker.

Every stage logs through `get_logger(stage)`, and a line reads the same wherever it was written:
`12:03:04 encode  4 raw shard(s), 0 already encoded, 4 to encode`.

- The driver (`setup_driver`) shows on the console the pipeline's own lines and the warnings of
  other libraries; the log file (RUN/logs/console.log for a local run) gets everything.
- Ray forwards what its workers print to the driver. Ray's `worker_process_setup_hook` runs
  `setup_worker` in every worker, so the pipeline's loggers write the same format there; the
  driver keeps on the console only the worker lines the pipeline wrote (`route_worker_output`)
  and sends the rest to the log file: Ray's own chatter (a placement-group cleaner that warns
  every few seconds, C++ core-worker notices), weight-loading bars, DeepSpeed's set-up lines.
- `--verbose` (PIPELINE_VERBOSE=1) turns the routing off: everything reaches the console.
- Per-step lines come from rank 0 only (`train.distributed.log`), as DiT's `create_logger` does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = "pipeline"  # every stage logger is a child: pipeline.encode, pipeline.train, ...
VERBOSE_ENV = "PIPELINE_VERBOSE"
WORKER_SETUP_HOOK = "pipeline.core.log.setup_worker"
LOG_FILE = "console.log"  # under layout.LOGS of a local run directory
FORMAT, DATE_FORMAT = "%(asctime)s %(stage)-6s %(message)s", "%H:%M:%S"
# A line a pipeline logger wrote, as Ray forwards it from a worker (colour codes stripped).
OURS = re.compile(r"^\d\d:\d\d:\d\d [\w.]+ +\S")
# Ray's loggers that print on the driver with handlers of their own.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
QUIET_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"

_log_file: Path | None = None  # set by setup_driver


class _StageFormatter(logging.Formatter):
    """FORMAT with `stage`: the logger's name below ROOT (pipeline.encode -> encode); for another library's
    logger, the library (ray.data._internal... -> ray)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith(ROOT + "."):
            record.stage = record.name.removeprefix(ROOT + ".")
        else:
            record.stage = "run" if record.name == ROOT else record.name.split(".")[0]
        return super().format(record)


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage (or part of one: "watch", "bench")."""
    return logging.getLogger(f"{ROOT}.{stage}")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class _Stderr:
    """Whatever sys.stderr is when a line is written (test harnesses and Ray swap it), not when the handler was made."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _LogFile(logging.Handler):
    """The log file. Each line is appended and the file closed again: nothing holds it open (the run
    directory can be unmounted or removed at any time), and the file and its folder are made at the first
    line, so a run directory that a bad config never starts stays unmade. A file that cannot be written
    (a full or read-only disk) is skipped: the console still shows what matters."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - a bad log call must not stop a stage
            return
        _append(self.path, line)


def _append(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError:
        pass


def append_to_log_file(text: str) -> None:
    """Add `text` to the log file, if there is one and it can be written."""
    if _log_file is not None:
        _append(_log_file, text)


def log_file() -> Path | None:
    """Where the driver's full log goes (set by setup_driver)."""
    return _log_file


def _handler(path: str | Path | None, level: int) -> logging.Handler:
    """A handler in FORMAT: to the log file at `path`, or to stderr."""
    handler = _LogFile(Path(path)) if path else logging.StreamHandler(_Stderr())
    handler.setLevel(level)
    handler.setFormatter(_StageFormatter(FORMAT, DATE_FORMAT))
    return handler


def setup_driver(log_file: str | Path | None = None, is_verbose: bool = False) -> Path:
    """Console and file handlers of the driver process; returns the log file's path.

    The pipeline's loggers reach the console at INFO, other libraries' (Ray's, Ray Data's,
    DeepSpeed's) at WARNING, or at INFO with `is_verbose`; the file gets INFO of everything.
    """
    if is_verbose:
        os.environ[VERBOSE_ENV] = "1"  # workers started from here inherit it
    global _log_file
    path = Path(log_file) if log_file else Path(tempfile.gettempdir()) / "pipeline-logs" / f"{os.getpid()}.log"
    _log_file = path
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pipeline", False)]:
        root.removeHandler(handler)
        handler.close()
    console = _handler(None, logging.INFO)
    if not verbose():
        console.addFilter(lambda record: record.name.startswith(ROOT) or record.levelno >= logging.WARNING)
    file = _handler(path, logging.INFO)
    for handler in (console, file):
        handler._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger(ROOT).setLevel(logging.INFO)
    _quiet_libraries()
    return path


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the pipeline's loggers print in FORMAT in every worker."""
    logger = logging.getLogger(ROOT)
    if not any(getattr(h, "_pipeline", False) for h in logger.handlers):
        handler = _handler(None, logging.INFO)
        handler._pipeline = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Ray Train's own root handler would print each line twice


def worker_env() -> dict[str, str]:
    """Environment for Ray's workers: --verbose, or else no weight-loading progress bars (every actor loads
    weights, and their bars would only reach the log file). An environment variable, so that light
    worker processes need not import transformers to set it."""
    return {VERBOSE_ENV: "1"} if verbose() else {QUIET_BARS_ENV: "1"}


def _quiet_libraries() -> None:
    if not verbose():
        os.environ.setdefault(QUIET_BARS_ENV, "1")  # read by huggingface_hub and transformers at import


def quiet_ray_driver() -> None:
    """In the driver, once ray is imported: Ray's own loggers write to the log file, and to the console
    only errors and Ray Data's periodic "Total Progress" line (with a rate added), unless --verbose."""
    if _log_file is None or verbose():
        return
    import ray.data  # noqa: F401 - configures its loggers on import: after that, not before

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, "_pipeline", False) for h in logger.handlers):
            continue
        for handler in list(logger.handlers):  # their consoles; their own log files stay
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        console = _handler(None, logging.INFO)
        console.addFilter(_ProgressRate())
        for handler in (console, _handler(_log_file, logging.INFO)):
            handler._pipeline = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False


class _ProgressRate(logging.Filter):
    """Lets errors through, and Ray Data's "Total Progress: N/M" lines (logged every few seconds when
    stdout is not a terminal) as "Ray Data progress N/M" with the rate since the previous one. N counts
    the rows of the dataset's input: for encode, raw shards."""

    PATTERN = re.compile(r"Total Progress: (\d+)/(\S+)")

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[float, int] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        found = self.PATTERN.search(record.getMessage())
        if not found:
            return False
        rows = int(found.group(1))
        message = f"Ray Data progress {rows}/{found.group(2)}"
        if self.last and record.created > self.last[0]:
            message += f" ({(rows - self.last[1]) / (record.created - self.last[0]):.2f}/s)"
        record.msg, record.args = message, None
        self.last = (record.created, rows)
        return True


def route_worker_output() -> None:
    """In the driver, after ray.init: worker lines the pipeline wrote go to the console, the rest to
    the log file (with the worker's name), unless --verbose. Ray prints worker output through one
    handler of its dispatcher; this wraps it. Without that handler (another Ray version), nothing changes."""
    if _log_file is None or verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handlers = dict(dispatcher.handlers)
    original = handlers.get("ray_print_logs")
    if original is None or getattr(original, "_pipeline", False):
        return

    def route(data: dict) -> None:
        lines = data.get("lines", [])
        ours = [line for line in lines if OURS.match(line)]
        rest = [line for line in lines if not OURS.match(line)]
        if rest:
            who = data.get("actor_name") or data.get("task_name") or "worker"
            append_to_log_file("".join(f"({who} pid={data.get('pid')}) {line}\n" for line in rest))
        if ours:
            original({**data, "lines": ours})

    route._pipeline = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)


@contextlib.contextmanager
def prints_to_log_file() -> Iterator[None]:
    """What a library prints on the driver inside this block (img2dataset's Reader) goes to the log file."""
    if _log_file is None or verbose():
        yield
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield
    append_to_log_file(printed.getvalue())
