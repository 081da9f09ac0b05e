"""No request of the downloading process escapes the egress guard, whatever img2dataset does inside.

img2dataset 1.47 fetches with `urllib.request.urlopen(request, timeout=...)`, which the guard's
global opener serves; its development branch passes an SSL context (`urlopen(..., context=ctx)`),
for which urllib builds a fresh, unguarded opener. These tests run img2dataset's real
`Downloader` against a real loopback server that must never see a request when loopback is not
allowed, as installed and as the development branch fetches.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset import downloader as img2dataset_downloader
from test_egress import SMALL_PNG, base_url, restore_global_state, serve  # noqa: F401 - the fixture is autouse

from ingest.download import accounting, distribute, egress
from pipeline.core.config import IngestConfig, load_config


@pytest.fixture
def server():
    with serve() as running:
        yield running


def _dev_branch_download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's download_image as its development branch writes it: an explicit SSL context."""
    key, url = row
    context = ssl.create_default_context()
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": "img2dataset"})
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return key, response.read(), None
    except Exception as err:  # noqa: BLE001
        return key, None, str(err)


def run_downloader(tmp_path, urls: list[str], settings: IngestConfig) -> list[dict]:
    """img2dataset's real Downloader, built as the ingest task builds it, on one shard of `urls`: its parquet rows."""
    output = tmp_path / "shards"
    output.mkdir()
    downloader = distribute._downloader(settings, str(output), ["caption", "url"], 5)
    arrow_file = tmp_path / "00000.feather"
    table = pa.table({"caption": [f"caption {i}" for i in range(len(urls))], "url": urls})
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    ok, _ = downloader((0, str(arrow_file)))
    assert ok
    return pq.read_table(output / "00000.parquet").to_pylist()


@pytest.mark.parametrize("fetch", ["img2dataset-as-installed", "dev-branch-ssl-context"])
def test_no_request_through_img2dataset_downloader_escapes_the_guard(tmp_path, server, monkeypatch, fetch):
    if fetch == "dev-branch-ssl-context":  # before install: as if img2dataset itself shipped it
        monkeypatch.setattr(img2dataset_downloader, "download_image", _dev_branch_download_image)
    settings = IngestConfig(source="urls", url_list="x.parquet", threads=2, timeout_s=5)
    egress.install(**distribute.guard_settings(settings))
    urls = [base_url(server) + "/image", base_url(server, host="localhost") + "/image"]
    try:
        rows = run_downloader(tmp_path, urls, settings)
    finally:  # before monkeypatch puts img2dataset's own function back: uninstall would restore the stand-in
        egress.uninstall()
    assert server.requests == []  # the loopback server never saw a request
    assert [row["status"] for row in rows] == ["failed_to_download"] * 2
    assert all(egress.REFUSED_ADDRESS in row["error_message"] for row in rows), rows
    assert {accounting.classify(row["status"], row["error_message"]) for row in rows} == {"refused_address"}


def test_the_guard_still_lets_allowed_requests_through_img2dataset(tmp_path, server):
    settings = IngestConfig(source="urls", url_list="x.parquet", allow_loopback=True, threads=2, timeout_s=5)
    egress.install(**distribute.guard_settings(settings))
    rows = run_downloader(tmp_path, [base_url(server) + "/image"], settings)
    assert [row["status"] for row in rows] == ["success"] and [path for path, _ in server.requests] == ["/image"]
    assert img2dataset_downloader.download_image is egress.download_image


def test_urlopen_with_an_ssl_context_stays_inside_the_guard(server):
    """Plain urllib builds a fresh opener for context=; in a guarded process that must not bypass it."""
    egress.install(allow_loopback=False)
    for call in (
        lambda: urllib.request.urlopen(base_url(server) + "/", timeout=5, context=ssl.create_default_context()),
        lambda: urllib.request.urlopen(base_url(server) + "/", timeout=5),
    ):
        with pytest.raises(urllib.error.URLError, match=egress.REFUSED_ADDRESS):
            call()
    assert server.requests == []
    egress.uninstall()
    with urllib.request.urlopen(base_url(server) + "/", timeout=5, context=ssl.create_default_context()) as response:
        assert response.read() == b"hello"  # uninstalled: urllib's own urlopen again


def test_the_guard_refuses_an_img2dataset_it_was_not_tested_with(monkeypatch):
    def retry_without_download_image(row, timeout, retries, user_agent_token, disallowed_header_directives):
        return urllib.request.urlopen(row[1], timeout=timeout)

    with monkeypatch.context() as patch:
        patch.setattr(img2dataset_downloader, "download_image_with_retry", retry_without_download_image)
        with pytest.raises(RuntimeError, match="no longer calls download_image"):
            egress.install()
    with monkeypatch.context() as patch:
        patch.setattr("importlib.metadata.version", lambda name: "1.48.0")
        with pytest.raises(RuntimeError, match="version 1.48.0 is outside the tested range"):
            egress.install()
    with monkeypatch.context() as patch:
        patch.setattr(img2dataset_downloader, "download_image", lambda row, timeout, ssl_context: None)
        with pytest.raises(RuntimeError, match="download_image is missing or no longer takes"):
            egress.install()
    egress.install()  # the installed one passes


def test_a_url_list_never_inherits_the_toy_sources_loopback_exception():
    urls = load_config("tiny", overrides=["ingest.source='urls'", "ingest.url_list='x.parquet'", "sample.judge='none'"])
    assert urls.ingest.allow_loopback is False
    assert distribute.guard_settings(urls.ingest)["allow_loopback"] is False
    toy = load_config("tiny")
    assert distribute.guard_settings(toy.ingest)["allow_loopback"] is True  # its own loopback server
    opted_in = load_config(
        "tiny",
        overrides=["ingest.source='urls'", "ingest.url_list='x.parquet'", "sample.judge='none'", "ingest.allow_loopback=true"],
    )
    assert distribute.guard_settings(opted_in.ingest)["allow_loopback"] is True
