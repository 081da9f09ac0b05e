"""One hostile host cannot stop ingest: a capped response, a deadline per request, a failed shard counted.

A real loopback server drips bytes (each one well within the socket timeout, so only an overall
deadline stops it) or sends more than the cap; a shard task that dies (a fault point SIGKILLs its
worker) or raises on every try is counted as failed, by why, while the other shards complete.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray.exceptions
import test_accounting
from test_accounting import write_shard
from test_egress import SMALL_PNG, restore_global_state  # noqa: F401 - the fixture is autouse
from test_egress_escape import run_downloader
from test_shard_outcomes import _clean_list

from ingest.download import accounting, distribute, egress
from pipeline.core import faults
from pipeline.core.config import ConfigError, IngestConfig, load_config
from pipeline.core.rundir import RunDir

DRIP_EVERY_S = 0.2  # each byte well within any socket timeout
GIVE_UP_S = 8.0  # the server stops dripping then: without a deadline a test fails instead of hanging
DEADLINE_S = 1.0
BIG = egress.DEFAULT_MAX_RESPONSE_BYTES + 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _drip(self, data: bytes) -> None:
        started = time.monotonic()
        for byte in data:
            if self.server.stop.wait(DRIP_EVERY_S) or time.monotonic() - started > GIVE_UP_S:
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def do_GET(self):  # noqa: N802
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def _answer(self):
        if self.path == "/image":
            self._send(200, SMALL_PNG, {"Content-Length": str(len(SMALL_PNG))})
        elif self.path == "/drip-body":
            self._send(200, b"", {"Content-Length": "1000"})
            self._drip(b"x" * 1000)
        elif self.path == "/drip-body-nolength":
            self.close_connection = True
            self._send(200, b"", {"Connection": "close"})
            self._drip(b"x" * 1000)
        elif self.path == "/drip-headers":
            self.close_connection = True
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n")
        elif self.path == "/big":
            self.close_connection = True
            self._send(200, b"\0" * BIG, {"Connection": "close"})
        elif self.path == "/big-length":
            self._send(200, b"", {"Content-Length": str(BIG)})  # refused from the header: no body needed
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, code, body, headers):
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def hostile_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server():
    with hostile_server() as base:
        yield base


# ---------------------------------------------------------------------------------------
# The request deadline
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/drip-body", "/drip-body-nolength", "/drip-headers"])
def test_a_server_dripping_bytes_is_cut_off_at_the_request_deadline(server, path):
    egress.install(allow_loopback=True, request_deadline_s=DEADLINE_S)
    started = time.monotonic()
    key, stream, error = egress.download_image((3, server + path), 5, None, None)  # 5 s socket timeout: never reached
    elapsed = time.monotonic() - started
    assert (key, stream) == (3, None)
    assert egress.REFUSED_DEADLINE in error and f"{DEADLINE_S:g} s request deadline" in error, error
    assert accounting.classify("failed_to_download", error) == "timeout"
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + 2, elapsed


def test_the_deadline_covers_urlopen_too_and_lets_fast_answers_through(server):
    egress.install(allow_loopback=True, request_deadline_s=DEADLINE_S)
    with urllib.request.urlopen(server + "/image", timeout=5) as response:
        assert response.read() == SMALL_PNG
    started = time.monotonic()
    with (
        pytest.raises(urllib.error.URLError, match=egress.REFUSED_DEADLINE),
        urllib.request.urlopen(server + "/drip-body", timeout=5) as response,
    ):
        response.read()
    assert time.monotonic() - started < DEADLINE_S + 2


def test_many_fast_requests_leave_no_descriptor_behind(server):
    import os

    egress.install(allow_loopback=True, request_deadline_s=DEADLINE_S)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert egress.download_image((0, server + "/image"), 5, None, None)[2] is None
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # the watchdog's duplicates are closed with each response


# ---------------------------------------------------------------------------------------
# The response cap
# ---------------------------------------------------------------------------------------


def test_the_default_cap_is_32_mb_not_the_pixel_limits_356():
    assert egress.EgressPolicy().body_cap == 32_000_000 == egress.DEFAULT_MAX_RESPONSE_BYTES
    assert egress.EgressPolicy().deadline_s == egress.DEFAULT_REQUEST_DEADLINE_S == 60.0


@pytest.mark.parametrize("path", ["/big", "/big-length"])
def test_an_oversized_response_is_refused_at_the_default_cap(server, path):
    egress.install(allow_loopback=True)
    _, stream, error = egress.download_image((0, server + path), 5, None, None)
    assert stream is None and egress.REFUSED_SIZE in error and str(egress.DEFAULT_MAX_RESPONSE_BYTES) in error, error
    assert accounting.classify("failed_to_download", error) == "too_large"


def test_the_cap_and_deadline_come_from_the_config():
    settings = IngestConfig(max_response_mb=2.5, request_deadline_s=7)
    guard = distribute.guard_settings(settings)
    assert (guard["max_response_bytes"], guard["request_deadline_s"]) == (2_500_000, 7)
    assert egress.env_for(**guard)[egress.ENV_MAX_RESPONSE_BYTES] == "2500000"
    assert egress.env_for(**guard)[egress.ENV_REQUEST_DEADLINE] == "7.0"
    unset = distribute.guard_settings(IngestConfig())
    assert (unset["max_response_bytes"], unset["request_deadline_s"]) == (None, None)  # egress's defaults
    for bad in ("ingest.max_response_mb=0", "ingest.request_deadline_s=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny", overrides=[bad])


def test_img2dataset_counts_the_slow_and_the_oversized_and_keeps_the_rest(tmp_path, server):
    """Through img2dataset's real Downloader: the reasons land in its parquet as accounting counts them."""
    settings = IngestConfig(
        source="urls",
        url_list="x.parquet",
        allow_loopback=True,
        threads=4,
        timeout_s=5,
        request_deadline_s=DEADLINE_S,
        max_response_mb=1,
    )
    egress.install(**distribute.guard_settings(settings))
    started = time.monotonic()
    rows = run_downloader(
        tmp_path, [server + "/image", server + "/drip-body", server + "/big", server + "/drip-headers"], settings
    )
    assert time.monotonic() - started < DEADLINE_S + 4
    reasons = [accounting.classify(row["status"], row["error_message"]) for row in rows]
    assert sorted(reasons) == ["success", "timeout", "timeout", "too_large"], rows


# ---------------------------------------------------------------------------------------
# A shard whose task fails for good
# ---------------------------------------------------------------------------------------


def test_shard_failure_reasons():
    assert distribute.shard_failure(ray.exceptions.OutOfMemoryError("killed: memory")) == "out_of_memory"
    assert distribute.shard_failure(ray.exceptions.WorkerCrashedError()) == "worker_died"
    raised = ray.exceptions.RayTaskError("_shard_task", "Traceback ...", RuntimeError("shard 00002 failed"))
    assert distribute.shard_failure(raised.as_instanceof_cause()) == "task_error"
    assert distribute.shard_failure(ValueError("?")) == "error"


class _Downloader:
    """What img2dataset writes for a shard, but shard 2 fails on every try (as a Downloader returning False does)."""

    column_list = ["caption", "url"]

    def __init__(self, run_path: str):
        self.run_path = run_path

    def __call__(self, row):
        import pyarrow as pa

        shard_id, arrow_file = row
        if shard_id == 2:
            return False, row
        urls = pa.ipc.open_file(arrow_file).read_all().column("url").to_pylist()
        write_shard(RunDir(self.run_path), shard_id, [("success", None)] * len(urls))
        return True, row


def test_a_shard_task_that_dies_or_raises_is_counted_failed_and_the_rest_completes(tmp_path, ray_local, monkeypatch, caplog):
    run = RunDir(tmp_path / "run")
    clean = _clean_list(run, [2, 3, 1, 2])
    ray_local.cloudpickle.register_pickle_by_value(test_accounting)
    ray_local.cloudpickle.register_pickle_by_value(__import__(__name__))
    monkeypatch.setattr(distribute, "_downloader", lambda *args: _Downloader(str(tmp_path / "run")))
    fired = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, json.dumps({"point": "ingest-shard", "shard": 1, "action": "kill", "once": str(fired)}))
    with caplog.at_level(logging.INFO, logger="pipeline.ingest"):
        downloaded = distribute.download(IngestConfig(cpus_per_task=0.5, shard_retries=0), clean, run)
    assert fired.exists()  # shard 1's worker was SIGKILLed
    stats = accounting.aggregate(downloaded.outcomes.values(), clean.prefilter(), downloaded.incomplete)
    assert stats["failed_shards"] == {"00001": "worker_died", "00002": "task_error"}
    assert (stats["shards"], stats["attempted"], stats["succeeded"]) == (2, 8, 4)
    assert stats["failed"] == {"shard_failed": 4}
    assert stats["attempted"] + sum(stats["prefiltered"].values()) == clean.rows
    lines = [record.getMessage() for record in caplog.records]
    assert "2 of 4 shard(s) failed and are counted as failed: 00001 (worker_died), 00002 (task_error)" in lines, lines
    assert 0 in accounting.list_shards(run).recorded and 3 in accounting.list_shards(run).recorded


def test_when_every_shard_fails_the_stage_fails_naming_them(tmp_path, ray_local, monkeypatch):
    run = RunDir(tmp_path / "run")
    clean = _clean_list(run, [1, 1])

    class Failing:
        column_list = ["caption", "url"]

        def __call__(self, row):
            return False, row

    monkeypatch.setattr(distribute, "_downloader", lambda *args: Failing())
    with pytest.raises(RuntimeError, match=r"every shard of ingest failed: 00000 \(task_error\), 00001 \(task_error\)"):
        distribute.download(IngestConfig(shard_retries=1, cpus_per_task=0.5), clean, run)
