import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The S3 stand-in's address is fixed before any Ray worker starts, so that workers inherit it
# (the server itself starts only when a test asks for `s3_server`).
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, stopped by PID at the end of the session."""
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=output, stderr=subprocess.STDOUT)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    deadline = time.monotonic() + 30
    while True:  # poll until it answers; give up with its log if it never does
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError as error:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from error
            time.sleep(0.1)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """A private Ray instance with 2 CPUs for the whole test session, shut down at the end."""
    import ray

    from pipeline.core.config import RayConfig
    from pipeline.core.ray_runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true, as .ci/run sets) a test runs or fails: a skip, whatever its reason, is a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under CI, which must run every test: {reason}"
