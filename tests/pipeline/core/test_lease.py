"""One driver per run directory: the lease, with real processes holding it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace

import pytest

from pipeline import runner
from pipeline.core import layout, lease
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir

HOLD = textwrap.dedent(
    """
    import sys
    from pipeline.core.lease import Lease
    from pipeline.core.rundir import RunDir
    Lease(RunDir(sys.argv[1]), "pipeline run --out first").acquire()
    print("held", flush=True)
    sys.stdin.read()  # holds it until the test closes stdin or kills this process
    """
)


@pytest.fixture
def other_driver(tmp_path):
    """A real second process that holds the run's lease until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_a_second_driver_is_refused_with_the_first_named(tmp_path, other_driver, fake_stages):
    with pytest.raises(runner.StageError) as refused:
        runner.run_stages(load_config("tiny"), RunDir(tmp_path))
    message = str(refused.value)
    assert f"pid {other_driver.pid}" in message and "pipeline run --out first" in message
    assert fake_stages[0] == [] and not (tmp_path / layout.RUN_MANIFEST).exists()  # nothing ran, nothing written


def test_a_killed_drivers_lease_is_taken_over_at_once(tmp_path, other_driver, fake_stages):
    other_driver.send_signal(signal.SIGKILL)
    other_driver.wait(timeout=30)
    runner.run_stages(load_config("tiny"), RunDir(tmp_path))
    assert fake_stages[0] == list(layout.STAGES)
    assert not (tmp_path / layout.LEASE).exists()  # given back at the end


def test_the_lease_is_given_back_after_a_failed_stage(tmp_path, monkeypatch):
    def broken(config, run):
        raise RuntimeError("broke")

    monkeypatch.setattr(runner, "stage_function", lambda name: broken)
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)
    with pytest.raises(RuntimeError, match="broke"):
        runner.run_stages(load_config("tiny"), RunDir(tmp_path))
    assert not (tmp_path / layout.LEASE).exists()


def _planted(tmp_path, **changes) -> lease.Holder:
    now = time.time()
    holder = lease.Holder(
        token="other", host="another-host", pid=1, process_started=0.0, command="pipeline run", taken=now, heartbeat=now
    )
    holder = replace(holder, **changes)
    (tmp_path / layout.LEASE).write_text(json.dumps(asdict(holder)))
    return holder


def test_another_hosts_live_lease_is_kept_and_a_silent_one_taken_over(tmp_path):
    run = RunDir(tmp_path)
    _planted(tmp_path)
    with pytest.raises(lease.LeaseHeld, match="on another-host"):
        lease.Lease(run).acquire()
    _planted(tmp_path, heartbeat=time.time() - lease.EXPIRES_S - 1)
    taken = lease.Lease(run).acquire()
    try:
        assert lease.Lease(run).read().token == taken.holder.token
    finally:
        taken.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """Same host, a live pid, but a process started at another time: the holder is gone."""
    import socket

    assert lease.abandoned(lease.Holder("t", socket.gethostname(), os.getpid(), 0.0, "x", time.time(), time.time()), time.time())
    mine = lease.Lease(RunDir(tmp_path)).holder
    assert not lease.abandoned(mine, time.time())


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    held = lease.Lease(RunDir(tmp_path)).acquire()
    try:
        first = held.holder.heartbeat
        assert held.renew()
        assert lease.Lease(RunDir(tmp_path)).read().heartbeat > first
        _planted(tmp_path)  # another driver took it (e.g. after a long pause of this one)
        assert not held.renew()
        assert "another driver took the lease: pid 1 on another-host" in held.lost
    finally:
        held.release()
    assert (tmp_path / layout.LEASE).exists()  # not ours to remove any more
