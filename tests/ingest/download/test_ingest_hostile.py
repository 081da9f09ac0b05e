"""The ingest stage against a loopback server that misbehaves in every way a LAION list does:
every bad row ends as a count in ingest/stats.json, the good ones as samples, nothing crashes."""

import io
import struct
import tarfile
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ingest.download.stage import run_stage
from pipeline.core import layout, toy
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir

GOOD = 12


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels of 1-bit grey: tiny on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * (side // 8)
    body = zlib.compress(row * 64, 9)  # only the first rows: decoders must refuse before reading on
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


class Handler(BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path.startswith("/good/"):
            self._send(200, self.images[path], {"Content-Type": "image/png"})
        elif path == "/missing":
            self._send(404, b"not found")
        elif path == "/private-redirect":
            self._send(302, headers={"Location": "http://10.1.2.3/image.png"})
        elif path == "/metadata-redirect":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/garbage":
            self._send(200, bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), {"Content-Type": "image/png"})
        elif path == "/bomb":
            self._send(200, _bomb_png(), {"Content-Type": "image/png"})
        elif path == "/opt-out":
            self._send(200, self.images["/good/0"], {"Content-Type": "image/png", "X-Robots-Tag": "noai"})
        elif path == "/truncated":
            self._send(200, self.images["/good/1"][:200], {"Content-Type": "image/png"})
        elif path == "/slow":
            self.server.release.wait(30)  # answers only after the client gave up (the test releases it)
            self._send(200, self.images["/good/2"], {"Content-Type": "image/png"})
        elif path == "/tiny":
            self._send(200, _png(Image.new("RGB", (4, 4), (1, 2, 3))), {"Content-Type": "image/png"})
        else:
            self._send(500)


@pytest.fixture
def hostile_server():
    Handler.images = {f"/good/{i}": _png(image) for i, (_, image) in enumerate(toy.generate(GOOD, 64, seed=5))}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.release.set()
    server.shutdown()
    server.server_close()


def test_every_bad_row_is_counted_and_never_fatal(tmp_path, hostile_server, ray_local):
    base = hostile_server
    rows = [(f"{base}/good/{i}", f"good image {i}", 0.1) for i in range(GOOD)]
    rows += [
        (f"{base}/good/0", "a duplicate URL", 0.1),
        (f"{base}/missing", "a 404", 0.1),
        (f"{base}/private-redirect", "redirect to a private address", 0.1),
        (f"{base}/metadata-redirect", "redirect to cloud metadata", 0.1),
        (f"{base}/garbage", "not an image", 0.1),
        (f"{base}/bomb", "a decompression bomb", 0.1),
        (f"{base}/opt-out", "X-Robots-Tag noai", 0.1),
        (f"{base}/tiny", "too small", 0.1),
        (f"{base}/truncated", "a truncated image", 0.1),
        (f"{base}/slow", "slower than the timeout", 0.1),
        ("ftp://example.org/a.png", "malformed", 0.1),
        ("not a url", "malformed", 0.1),
        (f"{base}/good/1?again", "", 0.1),
        (f"{base}/good/2?again", "x" * 1_000_000, 0.1),
        (f"{base}/good/3?again", "unsafe", 0.9),
    ]
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame(rows, columns=["URL", "TEXT", "punsafe"]).to_parquet(url_list, index=False)
    config = load_config(
        "tiny",
        overrides=[
            "ingest.source='urls'",
            f"ingest.url_list='{url_list}'",
            "ingest.url_column='URL'",
            "ingest.caption_column='TEXT'",
            "ingest.extra_columns=['punsafe']",
            "ingest.filters={punsafe={max=0.5}}",
            "ingest.allow_loopback=true",
            "ingest.min_image_size=16",
            "ingest.max_megapixels=50",
            "ingest.timeout_s=3",
            "ingest.samples_per_shard=10",
            "sample.judge='none'",
        ],
    )
    run = RunDir(tmp_path / "run")
    run_stage(config, run)

    stats = run.read_json(layout.INGEST_STATS)
    assert stats["succeeded"] == GOOD
    assert stats["prefiltered"] == {
        "duplicate_url": 1,
        "malformed_url": 2,
        "caption_too_short": 1,
        "caption_too_long": 1,
        "filtered:punsafe": 1,
    }
    failed = stats["failed"]
    assert failed.get("http_error") == 1
    assert failed.get("refused_address") == 2
    assert failed.get("not_an_image") == 2  # garbage bytes, truncated PNG
    assert failed.get("timeout") == 1
    assert failed.get("too_large") == 1
    assert failed.get("opt_out") == 1
    assert failed.get("too_small") == 1
    assert stats["attempted"] == GOOD + 9
    assert sum(failed.values()) == 9

    members = {}
    for shard in run.list(layout.INGEST_SHARDS, suffix=".tar"):
        with tarfile.open(tmp_path / "run" / layout.INGEST_SHARDS / shard) as archive:
            members.update({m.name: archive.extractfile(m).read() for m in archive.getmembers()})
    captions = sorted(v.decode() for k, v in members.items() if k.endswith(".txt"))
    assert captions == sorted(f"good image {i}" for i in range(GOOD))
    assert all(b'"punsafe": 0.1' in v for k, v in members.items() if k.endswith(".json"))
