"""`ray job submit` as docs/ray-cluster.md says, against a local Ray head of our own: `ray start --head` on
127.0.0.1 with token authentication on, its own temp dir and free ports, stopped by PID (never
`ray stop`, which stops every Ray on the machine). Then the tiny pipeline through
infra/ray/submit.sh, and the run directory's contract."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from run_contract import SMALL, check_run_contract, set_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Head:
    dashboard: str  # the job API: http://127.0.0.1:PORT
    token: str
    env: dict  # what a client that holds the token runs with

    def request(self, path: str, body: dict | None = None, token: str | None = "") -> tuple[int, str]:
        """(status, body) of a job API call; token "" means ours, None means no Authorization header."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.dashboard + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """Poll the job's status until it is terminal or `timeout` seconds pass; its last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = json.loads(self.request(f"/api/jobs/{job_id}")[1])["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
                return status
            time.sleep(2)


def stop_ray(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of the Ray started under `temp_dir` and their children
    (gcs_server and raylet may ignore SIGTERM). Only ours: each names the unique temp dir."""
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            roots.append(process)
    found = {process.pid: process for process in roots}
    for process in roots:
        try:
            found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    processes = list(found.values())
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs, a dashboard and token authentication, for this module."""
    # Our own token in our own file: the shared ~/.ray/auth_token stays untouched.
    token = uuid.uuid4().hex
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(token)
    # Short, because Ray's socket paths under it must stay below the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    # The head's PATH gives the job entrypoint its `pipeline` (the venv's).
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    dashboard_port, gcs_port = free_port(), free_port()
    # Ray processes that look for "the" cluster (Ray Train's placement group cleaner) would
    # otherwise find other people's Ray instances on this machine too, and give up.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    ports = {
        "--port": gcs_port,
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
        *[str(item) for pair in ports.items() for item in pair],
    ]
    head = Head(f"http://127.0.0.1:{dashboard_port}", token, {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"})
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        deadline = time.monotonic() + 120
        while True:  # the dashboard comes up after `ray start` returns
            try:
                if head.request("/api/jobs/")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not answer within 120 s"
            time.sleep(1)
        yield head
    finally:
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.e2e  # starts a Ray head of its own (`ray start`): `make test-e2e`, with the job it runs
def test_job_api_refuses_callers_without_the_token(ray_head, tmp_path):
    job = {"entrypoint": "echo hello"}
    assert ray_head.request("/api/jobs/", job, token=None)[0] == 401
    assert ray_head.request("/api/jobs/", job, token="not-the-token")[0] == 403
    # The CLI with no token anywhere (its default ~/.ray/auth_token hidden by another HOME).
    anonymous = {key: value for key, value in ray_head.env.items() if key not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    anonymous["HOME"] = str(tmp_path)
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--", "echo", "hello"],
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0 and "uthenticat" in refused.stdout + refused.stderr, refused.stderr[-2000:]

    status, body = ray_head.request("/api/jobs/", job)
    assert status == 200, body
    assert ray_head.wait_for_job(json.loads(body)["submission_id"], timeout=120) == "SUCCEEDED"


@pytest.mark.e2e
def test_tiny_pipeline_through_ray_job_submit(ray_head, tmp_path):
    out = tmp_path / "run"  # absolute: the job runs in a temporary copy of the working directory
    job_id = f"t2i-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    submitted = subprocess.run(
        [str(REPO / "infra/ray/submit.sh"), str(out), "--preset", "tiny", *set_args(SMALL)],
        env={**ray_head.env, "JOB_ID": job_id},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    submit_seconds = time.monotonic() - started
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert (
        f"job id: {job_id}" in submitted.stdout and f"ray job logs --address {ray_head.dashboard} -f {job_id}" in submitted.stdout
    )

    status = ray_head.wait_for_job(job_id, timeout=780)  # below pytest's 900 s timeout, to see the logs
    total_seconds = time.monotonic() - started
    print(f"\nray job submit: {submit_seconds:.1f} s to submit (upload included), {total_seconds:.1f} s to {status}")
    logs = json.loads(ray_head.request(f"/api/jobs/{job_id}/logs")[1])["logs"]
    assert status == "SUCCEEDED", logs[-6000:]
    check_run_contract(str(out))
