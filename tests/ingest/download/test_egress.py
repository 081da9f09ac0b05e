"""The egress guard (ingest/download/egress.py) against real loopback servers: SSRF and decompression bombs."""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from ingest.download import egress

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of zeros: tiny on the wire, width*height bytes once decoded."""
    row = b"\x00" * ((width + 7) // 8 + 1)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL_PNG = small_png()
BOMB_PNG = bomb_png(3000, 3000)  # 9 MP declared, ~1 KB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append((self.path, self.headers.get("Host")))
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/redirect":
            self._send(302, b"", [("Location", query["to"][0])])
        elif url.path == "/image":
            self._send(200, SMALL_PNG, [("Content-Type", "image/png")])
        elif url.path == "/bomb":
            self._send(200, BOMB_PNG, [("Content-Type", "image/png")])
        elif url.path == "/big":  # 5000 bytes, with or without Content-Length
            body = b"x" * 5000
            if "nolength" in query:
                self.close_connection = True
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            else:
                self._send(200, body, [])
        else:
            self._send(200, b"hello", [("Content-Type", "text/plain")])

    def _send(self, code, body, headers):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
    server = ThreadingHTTPServer((host, 0), _Handler)
    server.requests = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def base_url(server, scheme: str = "http", host: str | None = None) -> str:
    address, port = server.server_address[:2]
    return f"{scheme}://{host or address}:{port}"


@contextmanager
def watch_connects():
    """Every socket.connect made while watching: the proof that a refused address was never contacted."""
    seen = []
    original = socket.socket.connect

    def connect(sock, address):
        seen.append(address)
        return original(sock, address)

    socket.socket.connect = connect
    try:
        yield seen
    finally:
        socket.socket.connect = original


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test leaves urllib's global opener, the environment and Pillow's limit as found."""
    from PIL import Image

    opener = urllib.request._opener
    environ = dict(os.environ)
    pil_limit = Image.MAX_IMAGE_PIXELS
    yield
    egress.uninstall()  # urlopen and img2dataset's download_image too
    urllib.request.install_opener(opener)
    os.environ.clear()
    os.environ.update(environ)
    Image.MAX_IMAGE_PIXELS = pil_limit


@pytest.fixture
def server():
    with serve() as running:
        yield running


def refused(call) -> str:
    with pytest.raises(urllib.error.URLError) as caught:
        call()
    return str(caught.value)


# ---------------------------------------------------------------------------------------
# The address policy
# ---------------------------------------------------------------------------------------

# address: (default, allow_loopback, allow_private)
TABLE = {
    "8.8.8.8": (True, True, True),
    "1.1.1.1": (True, True, True),
    "93.184.216.34": (True, True, True),
    "172.32.0.1": (True, True, True),
    "100.128.0.1": (True, True, True),
    "127.0.0.1": (False, True, False),
    "127.255.255.254": (False, True, False),
    "0.0.0.0": (False, True, False),
    "0.1.2.3": (False, True, False),
    "10.0.0.1": (False, False, True),
    "172.16.5.4": (False, False, True),
    "172.31.255.255": (False, False, True),
    "192.168.1.1": (False, False, True),
    "169.254.169.254": (False, False, True),
    "169.254.0.1": (False, False, True),
    "100.64.0.1": (False, False, True),
    "100.127.255.255": (False, False, True),
    "192.0.0.1": (False, False, True),
    "192.0.2.1": (False, False, True),
    "198.18.0.1": (False, False, True),
    "198.51.100.1": (False, False, True),
    "203.0.113.1": (False, False, True),
    "224.0.0.1": (False, False, True),
    "239.255.255.250": (False, False, True),
    "240.0.0.1": (False, False, True),
    "255.255.255.255": (False, False, True),
    "2606:4700:4700::1111": (True, True, True),
    "2001:4860:4860::8888": (True, True, True),
    "::1": (False, True, False),
    "::": (False, True, False),
    "fe80::1": (False, False, True),
    "fe80::1%1": (False, False, True),
    "fc00::1": (False, False, True),
    "fd12:3456::1": (False, False, True),
    "fec0::1": (False, False, True),
    "ff02::1": (False, False, True),
    "2001:db8::1": (False, False, True),
    "2001::1": (False, False, True),  # Teredo
    "100::1": (False, False, True),
    "4000::1": (False, False, True),  # outside global unicast 2000::/3
    "::127.0.0.1": (False, False, True),  # deprecated IPv4-compatible
    "64:ff9b:1::1": (False, False, True),
    "::ffff:127.0.0.1": (False, True, False),  # IPv4-mapped forms are judged as IPv4
    "::ffff:10.0.0.1": (False, False, True),
    "::ffff:169.254.169.254": (False, False, True),
    "::ffff:100.64.0.1": (False, False, True),
    "::ffff:8.8.8.8": (True, True, True),
    "64:ff9b::a9fe:a9fe": (False, False, True),  # NAT64 of 169.254.169.254
    "64:ff9b::7f00:1": (False, True, False),  # NAT64 of 127.0.0.1
    "64:ff9b::808:808": (True, True, True),  # NAT64 of 8.8.8.8
    "2002:a00:1::1": (False, False, True),  # 6to4 of 10.0.0.1
    "2002:808:808::1": (True, True, True),  # 6to4 of 8.8.8.8
}


@pytest.mark.parametrize("address", sorted(TABLE))
def test_is_allowed_table(address):
    ip = ipaddress.ip_address(address)
    default, with_loopback, with_private = TABLE[address]
    assert egress.is_allowed(ip) is default
    assert egress.is_allowed(ip, allow_loopback=True) is with_loopback
    assert egress.is_allowed(ip, allow_private=True) is with_private
    assert egress.is_allowed(ip, allow_loopback=True, allow_private=True) is (with_loopback or with_private)


# ---------------------------------------------------------------------------------------
# Connect-time refusal, redirects, schemes
# ---------------------------------------------------------------------------------------


def test_loopback_is_refused_by_default_and_never_contacted(server):
    egress.install(allow_loopback=False, allow_private=False, max_megapixels=89)
    with watch_connects() as connects:
        message = refused(lambda: urllib.request.urlopen(base_url(server) + "/", timeout=5))
    assert egress.REFUSED_ADDRESS in message and "127.0.0.1" in message
    assert connects == [] and server.requests == []


def test_loopback_is_served_when_allowed(server):
    egress.install(allow_loopback=True, allow_private=False, max_megapixels=89)
    with urllib.request.urlopen(base_url(server) + "/image", timeout=5) as response:
        assert response.read() == SMALL_PNG
    assert egress.installed_policy().allow_loopback is True


@pytest.mark.parametrize(
    "target",
    ["http://10.1.2.3/", "http://169.254.169.254/latest/meta-data/", "https://169.254.169.254/", "http://[::ffff:a9fe:a9fe]/"],
)
def test_redirect_to_a_private_address_is_refused_before_any_connect(server, target):
    egress.install(allow_loopback=True, allow_private=False, max_megapixels=89)
    started = time.monotonic()
    with watch_connects() as connects:
        message = refused(lambda: urllib.request.urlopen(f"{base_url(server)}/redirect?to={target}", timeout=5))
    assert egress.REFUSED_ADDRESS in message
    assert urlparse(target).hostname in message
    assert time.monotonic() - started < 2
    assert [address[0] for address in connects] == ["127.0.0.1"]  # the first hop only


@dataclass(frozen=True)
class OnlyThisLoopback(egress.EgressPolicy):
    """Allows one loopback address (the test server's) and nothing else non-public."""

    only: str = "127.0.0.2"

    def allows(self, ip):
        return str(ip) == self.only or egress.is_allowed(ip)


@pytest.mark.parametrize("target", ["http://[::1]:{port}/", "http://localhost:{port}/", "http://127.0.0.1:{port}/"])
def test_redirect_to_loopback_is_refused_when_loopback_is_not_allowed(target):
    with serve("127.0.0.2") as server:  # reachable only because the test policy allows 127.0.0.2
        port = server.server_address[1]
        urllib.request.install_opener(egress.opener_for_policy(OnlyThisLoopback()))
        with watch_connects() as connects:
            message = refused(
                lambda: urllib.request.urlopen(f"{base_url(server)}/redirect?to={target.format(port=port)}", timeout=5)
            )
    assert egress.REFUSED_ADDRESS in message
    assert {address[0] for address in connects} == {"127.0.0.2"}
    assert [path for path, _ in server.requests] == [f"/redirect?to={target.format(port=port)}"]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA"])
def test_redirect_to_another_scheme_is_refused(server, target):
    egress.install(allow_loopback=True, allow_private=True, max_megapixels=89)
    message = refused(lambda: urllib.request.urlopen(f"{base_url(server)}/redirect?to={target}", timeout=5))
    assert egress.REFUSED_REDIRECT in message and target in message


def test_direct_non_http_schemes_are_refused():
    egress.install(allow_loopback=False, allow_private=True, max_megapixels=89)
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "data:text/plain,hi"):
        assert egress.REFUSED_SCHEME in refused(lambda url=url: urllib.request.urlopen(url, timeout=5))


def test_a_dns_answer_mixing_public_and_private_addresses_is_refused(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        assert host == "mixed.test"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    egress.install(allow_loopback=False, allow_private=False, max_megapixels=89)
    with watch_connects() as connects:
        message = refused(lambda: urllib.request.urlopen("http://mixed.test/", timeout=5))
    assert egress.REFUSED_ADDRESS in message and "10.0.0.7" in message and "mixed.test" in message
    assert connects == []


def test_connects_to_the_checked_address_without_a_second_lookup(server, monkeypatch):
    """A rebinding DNS server answers public/allowed first, private afterwards: one lookup only."""
    port = server.server_address[1]
    answers = iter(["127.0.0.1", "10.0.0.7", "10.0.0.7"])
    calls = []

    def rebinding_getaddrinfo(host, port_, *args, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port_))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    egress.install(allow_loopback=True, allow_private=False, max_megapixels=89)
    with urllib.request.urlopen(f"http://rebind.test:{port}/", timeout=5) as response:
        assert response.read() == b"hello"
    assert calls == ["rebind.test"]
    assert server.requests == [("/", f"rebind.test:{port}")]  # Host header keeps the name


def _self_signed(hostname: str):
    x509 = pytest.importorskip("cryptography.x509")
    from datetime import datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert_pem, key_pem


def test_https_keeps_sni_and_certificate_check_for_the_hostname(tmp_path):
    cert_pem, key_pem = _self_signed("localhost")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    with serve("127.0.0.1", tls=server_tls) as server:
        port = server.server_address[1]
        urllib.request.install_opener(egress.build_opener(allow_loopback=True, ssl_context=client_tls))
        with urllib.request.urlopen(f"https://localhost:{port}/", timeout=5) as response:
            assert response.read() == b"hello"  # verified as "localhost", connected to 127.0.0.1
        # The certificate is checked: the same server under its IP does not match "localhost".
        message = refused(lambda: urllib.request.urlopen(f"https://127.0.0.1:{port}/", timeout=5))
        assert "certificate" in message.lower() or "hostname" in message.lower()
        urllib.request.install_opener(egress.build_opener(allow_loopback=False, ssl_context=client_tls))
        assert egress.REFUSED_ADDRESS in refused(lambda: urllib.request.urlopen(f"https://localhost:{port}/", timeout=5))


# ---------------------------------------------------------------------------------------
# Bodies: size cap and decompression bombs
# ---------------------------------------------------------------------------------------


def test_an_image_over_the_megapixel_limit_is_refused_from_its_header(server):
    egress.install(allow_loopback=True, allow_private=False, max_megapixels=1)
    with urllib.request.urlopen(base_url(server) + "/image", timeout=5) as response:
        assert response.read() == SMALL_PNG
    with urllib.request.urlopen(base_url(server) + "/bomb", timeout=5) as response:
        message = refused(response.read)
    assert egress.REFUSED_BOMB in message and "9.0 MP over the 1 MP limit" in message


@pytest.mark.parametrize("query", ["", "?nolength=1"])
def test_a_body_over_the_cap_is_refused(server, query):
    urllib.request.install_opener(egress.build_opener(allow_loopback=True, max_response_bytes=1000))
    with urllib.request.urlopen(base_url(server) + "/big" + query, timeout=5) as response:
        assert egress.REFUSED_SIZE in refused(response.read)
    urllib.request.install_opener(egress.build_opener(allow_loopback=True, max_response_bytes=5000))
    with urllib.request.urlopen(base_url(server) + "/big" + query, timeout=5) as response:
        assert len(response.read()) == 5000


_CV2_SCRIPT = """
import os, sys
import numpy as np
late = sys.argv[1] == "late"
limit = os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS") if late else None
import cv2
if late:
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = limit
data = np.frombuffer(sys.stdin.buffer.read(), np.uint8)
try:
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    print("decoded", None if image is None else image.shape)
except cv2.error as err:
    print("refused", err)
"""


@pytest.mark.parametrize("when", ["before", "late"])
def test_opencv_pixel_limit_needs_the_environment_before_cv2_is_imported(when):
    pytest.importorskip("cv2")
    env = {**os.environ, **egress.env_for(max_megapixels=1)}
    result = subprocess.run([sys.executable, "-c", _CV2_SCRIPT, when], input=BOMB_PNG, env=env, capture_output=True, timeout=60)
    output = result.stdout.decode()
    if when == "before":
        assert output.startswith("refused") and egress.CV2_PIXEL_LIMIT_MESSAGE in output, output
    else:  # cv2 read its limit at import: setting it afterwards does nothing
        assert output.strip() == "decoded (3000, 3000)", output


# ---------------------------------------------------------------------------------------
# Environment round trip and img2dataset's own download path
# ---------------------------------------------------------------------------------------


def test_env_for_and_install_from_env(monkeypatch):
    env = egress.env_for(allow_loopback=True, allow_private=False, max_megapixels=12.5)
    assert env == {
        "T2I_EGRESS_ALLOW_LOOPBACK": "1",
        "T2I_EGRESS_ALLOW_PRIVATE": "0",
        "T2I_MAX_MEGAPIXELS": "12.5",
        "OPENCV_IO_MAX_IMAGE_PIXELS": "12500000",
    }
    for name in list(env) + [egress.ENV_MAX_RESPONSE_BYTES]:
        monkeypatch.delenv(name, raising=False)
    egress.install_from_env()  # defaults: refuse both, 89 MP
    assert egress.installed_policy() == egress.EgressPolicy(False, False, 89.0)
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "89000000"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    egress.install_from_env()
    from PIL import Image

    assert egress.installed_policy() == egress.EgressPolicy(True, False, 12.5)
    assert Image.MAX_IMAGE_PIXELS == 12_500_000
    egress.uninstall()
    assert egress.installed_policy() is None


def test_img2dataset_download_image_goes_through_the_installed_guard(server):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import download_image

    egress.install(allow_loopback=False, allow_private=False, max_megapixels=89)
    key, stream, error = download_image((7, base_url(server) + "/image"), 5, None, None)
    assert (key, stream) == (7, None) and egress.REFUSED_ADDRESS in error

    egress.install(allow_loopback=True, allow_private=False, max_megapixels=89)
    key, stream, error = download_image((7, base_url(server) + "/image"), 5, None, None)
    assert error is None and stream.getvalue() == SMALL_PNG
    url = base_url(server) + "/redirect?to=http://169.254.169.254/latest/meta-data/"
    _, stream, error = download_image((8, url), 5, None, None)
    assert stream is None and egress.REFUSED_ADDRESS in error and "169.254.169.254" in error

    egress.install(allow_loopback=True, allow_private=False, max_megapixels=1)
    _, stream, error = download_image((9, base_url(server) + "/bomb"), 5, None, None)
    assert stream is None and egress.REFUSED_BOMB in error
