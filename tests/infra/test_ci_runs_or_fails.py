"""Tests that need something the machine may lack (a Docker engine, `mount`, Chromium) skip outside
CI with the reason, and fail under CI (CI=true, as .ci/run exports): there they must run. Each is
run here with what it needs taken away, both ways."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def environment(ci: bool, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    return {**env, **extra}


def stub_bin(folder: Path, **scripts: str) -> Path:
    """A folder of executables named after the keywords, each running its shell `script`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, script in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{script}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("ci", [False, True], ids=["outside-ci", "under-ci"])
def test_image_test_without_a_docker_engine_skips_outside_ci_and_fails_under_it(tmp_path, ci):
    # No engine answers and none can be started: `docker info` fails, dockerd exits at once.
    stubs = stub_bin(
        tmp_path / "bin", docker="exit 1", dockerd="echo 'dockerd: cannot start here' >&2; exit 1", debootstrap="exit 1"
    )
    env = environment(ci, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", IMAGE_TEST_DIR=str(tmp_path / "work"))
    env.pop("DOCKER_HOST", None)
    result = subprocess.run(
        ["bash", "tests/infra/build-image.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    if ci:
        assert result.returncode == 1, output
        assert "FAIL: no Docker engine (" in result.stderr and "CI" in result.stderr, output
    else:
        assert result.returncode == 0, output
        assert "skipped: no Docker engine (" in result.stdout, output


# The tests that skip without `mount` or Chromium; pytest runs them with both taken away.
NEEDS_MOUNT = "tests/faults/test_output_errors.py::test_a_read_only_out_fails_with_one_line"
NEEDS_CHROMIUM = "tests/sample/report/test_report_browser.py"


@pytest.mark.e2e  # two pytest runs in subprocesses: `make test-e2e` runs it
@pytest.mark.parametrize("ci", [False, True], ids=["outside-ci", "under-ci"])
def test_mount_and_browser_tests_skip_outside_ci_and_fail_under_it(tmp_path, ci):
    stubs = stub_bin(tmp_path / "bin", mount="echo 'mount: permission denied' >&2; exit 32")
    env = environment(ci, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", CHROMIUM=str(tmp_path / "no-chromium"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
            NEEDS_MOUNT,
            NEEDS_CHROMIUM,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    browser_tests = [line for line in summary if "test_report_browser" in line]
    mount_tests = [line for line in summary if "test_output_errors" in line]
    assert browser_tests and mount_tests, output
    if ci:
        assert result.returncode == 1, output
        # A failure in a fixture is reported as an error: either way, not a skip.
        assert all(line.startswith(("FAILED", "ERROR")) for line in summary), output
        assert all("no Chromium" in line for line in browser_tests) and all("cannot mount" in line for line in mount_tests), (
            output
        )
    else:
        assert result.returncode == 0, output
        assert all(line.startswith("SKIPPED") for line in summary), output
        assert all("no Chromium" in line for line in browser_tests) and all("cannot mount" in line for line in mount_tests), (
            output
        )
