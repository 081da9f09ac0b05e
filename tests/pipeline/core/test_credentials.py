"""Credentials in a URL list's URL never reach config.toml, logs or the report: the config refuses
them, naming the key and where credentials go instead; the report and error messages redact
them. And the dependency floors that carry protections we rely on."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

from pipeline import cli
from pipeline.core import layout
from pipeline.core.config import ConfigError, load_config
from pipeline.core.credentials import embedded_credential, redact
from pipeline.core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[3]
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"

WITH_CREDENTIALS = [
    f"https://user:{SECRET}@host.example/list.parquet",
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/laion/urls.parquet",
    f"simplecache::s3://AKIA:{SECRET}@bucket/urls.parquet",
    f"https://{SECRET}@host.example/list.parquet",  # a bare token as the user
    f"https://bucket.s3.amazonaws.com/list.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature={SECRET}",
    f"https://acct.blob.core.windows.net/c/list.parquet?sv=2024-01-01&sp=r&sig={SECRET}",
    f"https://storage.googleapis.com/b/list.parquet?X-Goog-Signature={SECRET}",
    f"https://host.example/list.jsonl?token={SECRET}",
]
WITHOUT = [
    "s3://bucket/laion/urls.parquet",
    "https://host.example/data/list.parquet?version=2&format=parquet",
    "/data/urls.parquet",
    "hf://datasets/org/name/urls.parquet",
    "https://host.example/user@home/list.csv",  # '@' in the path is not userinfo
]


def url_list_config(url: str):
    return load_config("tiny", overrides=['ingest.source="urls"', f'ingest.url_list="{url}"', 'sample.judge="none"'])


@pytest.mark.parametrize("url", WITH_CREDENTIALS)
def test_config_refuses_a_url_list_with_a_credential_naming_the_key_never_the_secret(url):
    assert embedded_credential(url)
    with pytest.raises(ConfigError) as raised:
        url_list_config(url)
    message = str(raised.value)
    assert "ingest.url_list" in message and "credential" in message
    assert "AWS_ACCESS_KEY_ID" in message and "netrc" in message  # where credentials go instead
    assert SECRET not in message


@pytest.mark.parametrize("url", WITHOUT)
def test_config_accepts_a_url_list_without_credentials(url):
    assert embedded_credential(url) is None
    assert url_list_config(url).ingest.url_list == url


def test_redact_keeps_the_url_readable_and_drops_only_the_secret():
    assert redact(f"read https://user:{SECRET}@host/x.parquet failed") == "read https://REDACTED@host/x.parquet failed"
    assert (
        redact(f"url_list = 'https://b.s3.amazonaws.com/l.parquet?X-Amz-Date=20260101&X-Amz-Signature={SECRET}&v=1'")
        == "url_list = 'https://b.s3.amazonaws.com/l.parquet?X-Amz-Date=20260101&X-Amz-Signature=REDACTED&v=1'"
    )
    for url in WITH_CREDENTIALS:
        assert SECRET not in redact(url)
    for url in WITHOUT:
        assert redact(url) == url


def test_pipeline_run_with_a_credential_in_the_url_list_writes_it_nowhere(tmp_path):
    out = tmp_path / "run"
    url = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/urls.parquet"
    result = CliRunner().invoke(
        cli.app,
        ["run", "--preset", "tiny", "--out", str(out), "--set", 'ingest.source="urls"', "--set", f'ingest.url_list="{url}"'],
    )
    assert result.exit_code == 2, result.output
    assert "ingest.url_list" in result.output and SECRET not in result.output
    assert not (out / layout.CONFIG).exists()
    written = [path for path in out.rglob("*") if path.is_file()] if out.exists() else []
    assert not [path for path in written if SECRET in path.read_text(errors="replace")]


def test_the_report_redacts_a_credential_left_in_an_old_runs_config(tmp_path):
    from sample.report import stage as report

    run = RunDir(tmp_path / "old")
    run.write_text(
        layout.CONFIG, f'[ingest]\nsource = "urls"\nurl_list = "https://user:{SECRET}@host/list.parquet?sig={SECRET}"\n'
    )
    report.run_stage(None, run)
    page = run.read_text(layout.REPORT_INDEX)
    assert SECRET not in page
    assert "https://REDACTED@host/list.parquet?sig=REDACTED" in page


def test_an_error_naming_a_missing_url_list_redacts_it():
    from ingest.download.url_sources import list_files

    with pytest.raises(ValueError) as raised:
        list_files(f"memory://nowhere/list.parquet?X-Amz-Signature={SECRET}")
    assert SECRET not in str(raised.value) and "REDACTED" in str(raised.value)


# --- dependency floors -------------------------------------------------------------------------

FLOORS = {
    "torch": "2.6",  # torch.load(weights_only=True) can be bypassed below it (CVE-2025-32434)
    "ray": "2.59",  # token authentication on by default for local clusters
}


@pytest.mark.parametrize("name", FLOORS)
def test_dependency_floor_carries_the_protection(name):
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(item) for item in dependencies if Requirement(item).name == name]
    floor = Version(FLOORS[name])
    below = Version(f"{floor.major}.{floor.minor - 1}")
    assert floor in requirement.specifier and below not in requirement.specifier, str(requirement)
    assert Version(metadata.version(name)) in requirement.specifier
