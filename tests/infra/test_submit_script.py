"""infra/ray/submit.sh without a cluster: a stand-in `ray` package on PYTHONPATH records what the
script submits. The entrypoint, run by a shell as the head runs it, must hand every argument to
`pipeline` as one literal argument and run nothing else; the runtime env must leave credentials
behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

STUB_CLIENT = """
import json, os

class JobSubmissionClient:
    def __init__(self, address, *args, **kwargs):
        self.address = address

    def submit_job(self, **kwargs):
        with open(os.environ["SUBMIT_RECORD"], "w") as file:
            json.dump({"address": self.address, **kwargs}, file)
        return kwargs.get("submission_id")
"""

# Records its arguments, as the head's `pipeline` would receive them.
STUB_PIPELINE = """#!/bin/sh
"$PYTHON" -c 'import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], "w"))' "$PIPELINE_RECORD" "$@"
"""


def submit(tmp_path: Path, *args: str) -> dict:
    """Run submit.sh with the stand-in Ray SDK; what it passed to `submit_job`."""
    stub = tmp_path / "stub"
    (stub / "ray").mkdir(parents=True)
    (stub / "ray" / "__init__.py").write_text("")
    (stub / "ray" / "job_submission.py").write_text(STUB_CLIENT)
    record = tmp_path / "submitted.json"
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(stub),
        "SUBMIT_RECORD": str(record),
        "JOB_ID": "t2i-test",
        "RAY_ADDRESS": "http://127.0.0.1:1",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [str(REPO / "infra/ray/submit.sh"), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job id: t2i-test" in result.stdout
    return json.loads(record.read_text())


def test_submit_quotes_every_argument_so_the_head_shell_runs_nothing_else(tmp_path):
    marker = tmp_path / "MARKER"
    hostile_out = f"s3://b/x;touch {marker}"
    hostile_set = f"train.lr=1$(touch {marker})`touch {marker}`|touch {marker}"
    submitted = submit(tmp_path, hostile_out, "--preset", "tiny", "--set", hostile_set, "--config", "my config.toml")
    assert submitted["submission_id"] == "t2i-test"
    assert submitted["address"] == "http://127.0.0.1:1"

    # The head runs the entrypoint through a shell: do the same, with a `pipeline` that records its argv.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "pipeline").write_text(STUB_PIPELINE)
    (fake_bin / "pipeline").chmod(0o755)
    argv_record = tmp_path / "argv.json"
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable, "PIPELINE_RECORD": str(argv_record)}
    ran = subprocess.run(["sh", "-c", submitted["entrypoint"]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(argv_record.read_text()) == [
        "run",
        "--out",
        hostile_out,
        "--preset",
        "tiny",
        "--set",
        hostile_set,
        "--config",
        "my config.toml",
    ]
    assert not marker.exists(), "the entrypoint ran a command smuggled in an argument"


def test_submit_sends_the_runtime_env_with_the_checkout_as_working_dir(tmp_path):
    submitted = submit(tmp_path, "/shared/runs/a")
    runtime_env = submitted["runtime_env"]
    assert runtime_env["working_dir"] == "."
    assert runtime_env == {**yaml.safe_load((REPO / "infra/ray/runtime_env.yaml").read_text()), "working_dir": "."}


def test_runtime_env_leaves_credential_files_behind(tmp_path):
    """Ray's own packaging, with the excludes of infra/ray/runtime_env.yaml, on a tree holding credentials."""
    from ray._private.runtime_env.packaging import _zip_files

    excludes = yaml.safe_load((REPO / "infra/ray/runtime_env.yaml").read_text())["excludes"]
    tree = tmp_path / "checkout"
    files = {
        "pipeline/cli.py": True,
        "configs/run.toml": True,
        "README.md": True,
        ".env": False,
        "prod.env": False,
        "configs/s3.env": False,
        "secret.yaml": False,
        "infra/k8s/secret.example.yaml": False,
        "configs/secrets/key": False,
        ".venv/bin/python": False,
        ".git/config": False,
    }
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    package = tmp_path / "package.zip"
    _zip_files(str(tree), excludes, str(package), include_gitignore=False)
    uploaded = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert uploaded == {name for name, kept in files.items() if kept}
