"""One log (pipeline.core.log): the line format, what the driver's console shows and what only the log
file gets, and the routing of Ray's forwarded worker output, through Ray's real dispatcher."""

from __future__ import annotations

import logging

import pytest
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from pipeline.core import log


@pytest.fixture
def driver_log(tmp_path, capsys):
    """setup_driver into tmp_path; the pipeline's handlers and Ray's dispatcher restored afterwards."""
    saved_handlers = list(dispatcher.handlers)
    path = log.setup_driver(tmp_path / "console.log")
    yield path
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pipeline", False)]:
        root.removeHandler(handler)
        handler.close()
    dispatcher.handlers = saved_handlers
    log._log_file = None


def test_a_stage_line_names_its_stage_and_is_recognised_when_a_worker_forwards_it(driver_log, capsys):
    log.get_logger("encode").info("4 raw shard(s)")
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.endswith(" encode 4 raw shard(s)")]
    assert log.OURS.match(line)
    assert not log.OURS.match("2026-12-06 04:07:18,962\tINFO worker.py:2038 -- Started a local Ray instance.")


def test_console_shows_the_pipeline_and_warnings_the_file_gets_everything(driver_log, capsys):
    log.get_logger("train").info("step 5")
    logging.getLogger("deepspeed").info("set-up chatter")
    logging.getLogger("some.library").warning("a library warning")
    console = capsys.readouterr().err
    assert "step 5" in console and "a library warning" in console and "set-up chatter" not in console
    written = driver_log.read_text()
    assert "step 5" in written and "set-up chatter" in written and "a library warning" in written


def test_verbose_shows_everything(tmp_path, capsys, monkeypatch, driver_log):
    monkeypatch.setenv(log.VERBOSE_ENV, "0")  # restored afterwards: setup_driver sets it to "1"
    log.setup_driver(tmp_path / "verbose.log", is_verbose=True)
    logging.getLogger("deepspeed").info("set-up chatter")
    assert "set-up chatter" in capsys.readouterr().err


def test_worker_lines_of_the_pipeline_reach_the_console_the_rest_the_log_file(driver_log):
    printed = []
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", printed.append)
    log.route_worker_output()
    log.route_worker_output()  # idempotent: wraps Ray's printer once
    dispatcher.emit(
        {
            "pid": 7,
            "actor_name": "PlacementGroupCleaner",
            "is_err": True,
            "lines": [
                "04:08:27 train  step 5  loss 0.94",
                "Failed to query Ray Train Controller actor state.",
                "Loading weights: 100%",
            ],
        }
    )
    assert [data["lines"] for data in printed] == [["04:08:27 train  step 5  loss 0.94"]]
    written = driver_log.read_text()
    assert "(PlacementGroupCleaner pid=7) Failed to query Ray Train Controller actor state." in written
    assert "Loading weights" in written and "step 5" not in written


def test_ray_data_progress_lines_get_a_rate_and_other_ray_info_stays_off_the_console():
    rate = log._ProgressRate()
    first = logging.LogRecord("ray.data", logging.INFO, "", 0, "Total Progress: 100/?", None, None)
    second = logging.LogRecord("ray.data", logging.INFO, "", 0, "Total Progress: 300/?", None, None)
    second.created = first.created + 10
    other = logging.LogRecord("ray.data", logging.INFO, "", 0, "Execution plan of Dataset ...", None, None)
    assert rate.filter(first) and rate.filter(second) and not rate.filter(other)
    assert first.getMessage() == "Ray Data progress 100/?"
    assert second.getMessage() == "Ray Data progress 300/? (20.00/s)"
    line = log._handler(None, logging.INFO).format(second)
    assert line.endswith(" ray    Ray Data progress 300/? (20.00/s)")
