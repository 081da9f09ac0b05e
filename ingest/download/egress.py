"""Egress guard for ingest: server-side request forgery and decompression bombs.

A URL list is untrusted input and ingest runs inside clusters, next to cloud metadata
endpoints (169.254.169.254), Kubernetes services and other private hosts. img2dataset
downloads with `urllib.request.urlopen`, i.e. through urllib's *global* opener, so
`install()` replaces that opener, in the process that downloads, with one that:

- resolves the host itself, refuses the request if ANY resolved address is not public
  (`is_allowed`), then connects to exactly the address it checked (no second lookup, so
  no DNS-rebinding window), while the Host header, TLS SNI and certificate check keep
  using the URL's hostname;
- does the same for every redirect (urllib opens each hop through the same handlers) and
  refuses redirects to anything but http/https (file:, ftp:, data:, ...);
- refuses URL schemes other than http/https (file: only with allow_loopback);
- ignores proxy environment variables (a proxy would resolve the host out of our sight);
- caps the response body (default 4 bytes per allowed pixel) and reads the image header of
  the body (Pillow, header only) to refuse images over the megapixel limit before anything
  decodes them.

It also sets OpenCV's pixel limit (`OPENCV_IO_MAX_IMAGE_PIXELS`, which cv2 reads ONCE, when
it is imported: it must be in the environment before the downloading process imports cv2,
e.g. through a Ray runtime_env's env_vars; `env_for()` gives them) and Pillow's
`Image.MAX_IMAGE_PIXELS`.

Every refusal is an `urllib.error.URLError` (img2dataset records `str(err)` as the
sample's error_message) whose text contains one of the phrases below, for accounting.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Phrases the accounting classifies by (each refusal's message contains exactly one).
REFUSED_ADDRESS = "refused non-public address"
REFUSED_SCHEME = "refused URL scheme"
REFUSED_REDIRECT = "refused redirect to non-http(s) URL"
REFUSED_BOMB = "refused decompression bomb"
REFUSED_SIZE = "refused oversized response"
# What cv2 says when OPENCV_IO_MAX_IMAGE_PIXELS stops a decode (img2dataset records it as is).
CV2_PIXEL_LIMIT_MESSAGE = "CV_IO_MAX_IMAGE_PIXELS"

ENV_ALLOW_LOOPBACK = "T2I_EGRESS_ALLOW_LOOPBACK"
ENV_ALLOW_PRIVATE = "T2I_EGRESS_ALLOW_PRIVATE"
ENV_MAX_MEGAPIXELS = "T2I_MAX_MEGAPIXELS"
ENV_MAX_RESPONSE_BYTES = "T2I_MAX_RESPONSE_BYTES"
ENV_OPENCV_MAX_PIXELS = "OPENCV_IO_MAX_IMAGE_PIXELS"
DEFAULT_MAX_MEGAPIXELS = 89.0
BYTES_PER_PIXEL_CAP = 4  # default body cap: an uncompressed 8-bit RGBA image at the pixel limit

# ---------------------------------------------------------------------------------------
# Address policy
# ---------------------------------------------------------------------------------------

_N = ipaddress.ip_network
# Reaching these means reaching this machine: 0.0.0.0 and :: connect to the local host on Linux.
_LOOPBACK_LIKE = (_N("127.0.0.0/8"), _N("0.0.0.0/8"), _N("::1/128"), _N("::/128"))
# Not public, whatever this Python's ipaddress tables say (they changed across 3.11.x/3.12.x).
_NON_PUBLIC = (
    _N("10.0.0.0/8"),
    _N("100.64.0.0/10"),
    _N("169.254.0.0/16"),
    _N("172.16.0.0/12"),
    _N("192.0.0.0/24"),
    _N("192.0.2.0/24"),
    _N("192.88.99.0/24"),
    _N("192.168.0.0/16"),
    _N("198.18.0.0/15"),
    _N("198.51.100.0/24"),
    _N("203.0.113.0/24"),
    _N("224.0.0.0/4"),
    _N("240.0.0.0/4"),  # includes 255.255.255.255
    _N("::/96"),  # deprecated IPv4-compatible addresses
    _N("64:ff9b:1::/48"),
    _N("100::/64"),
    _N("2001::/23"),
    _N("2001:db8::/32"),
    _N("3fff::/20"),
    _N("5f00::/16"),
    _N("fc00::/7"),
    _N("fe80::/10"),
    _N("fec0::/10"),
    _N("ff00::/8"),
)
_NAT64 = _N("64:ff9b::/96")  # a NAT64 gateway forwards to the embedded IPv4 address
_GLOBAL_UNICAST_V6 = _N("2000::/3")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to: mapped (::ffff:a.b.c.d), NAT64 or 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def is_allowed(ip: IPAddress, allow_loopback: bool = False, allow_private: bool = False) -> bool:
    """Whether ingest may connect to `ip`. By default only global unicast addresses pass.

    Loopback (and the unspecified address, which reaches the local host) needs
    allow_loopback; every other non-public address (private, link-local including cloud
    metadata 169.254.169.254, shared 100.64/10, documentation, benchmarking, reserved,
    multicast, broadcast, unique-local, site-local, ...) needs allow_private. IPv6 forms
    that lead to an IPv4 address (mapped, NAT64, 6to4) are judged by that address.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%")[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_allowed(embedded, allow_loopback, allow_private)
    if any(ip in net for net in _LOOPBACK_LIKE) or ip.is_loopback or ip.is_unspecified:
        return allow_loopback
    public = (
        ip.is_global
        and not any(ip in net for net in _NON_PUBLIC)
        and not (ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved)
        and (ip.version == 4 or ip in _GLOBAL_UNICAST_V6)
    )
    return public or allow_private


@dataclass(frozen=True)
class EgressPolicy:
    allow_loopback: bool = False
    allow_private: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_response_bytes: int | None = None  # None: BYTES_PER_PIXEL_CAP bytes per allowed pixel

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def body_cap(self) -> int:
        return self.max_response_bytes if self.max_response_bytes is not None else BYTES_PER_PIXEL_CAP * self.max_pixels

    def allows(self, ip: IPAddress) -> bool:
        return is_allowed(ip, self.allow_loopback, self.allow_private)


class EgressRefused(OSError):
    """Raised inside urllib's connection; urllib wraps it in URLError (do_open catches OSError)."""


# ---------------------------------------------------------------------------------------
# Connections: check at connect time, connect to the checked address
# ---------------------------------------------------------------------------------------


def guarded_create_connection(policy: EgressPolicy, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """`socket.create_connection` that resolves once, refuses if any answer is not allowed,
    and connects only to the addresses it checked."""
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo returned no address for {host!r}")
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not policy.allows(ip):
            # Refuse the whole host: a DNS answer mixing public and private addresses must not
            # let a retry (ours or the caller's) land on the private one.
            raise EgressRefused(f"{REFUSED_ADDRESS} {ip} for host {host!r}")
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            error = err
            if sock is not None:
                sock.close()
    assert error is not None
    raise error


class GuardedHTTPResponse(http.client.HTTPResponse):
    """Caps the body and refuses images whose header declares more pixels than allowed."""

    _egress_policy: EgressPolicy | None = None
    _egress_read = 0

    def read(self, amt=None):
        policy = self._egress_policy
        if policy is None:
            return super().read(amt)
        cap = policy.body_cap
        if amt is not None:
            data = super().read(amt)
            self._egress_read += len(data)
            if self._egress_read > cap:
                self.close()
                raise urllib.error.URLError(f"{REFUSED_SIZE}: more than {cap} bytes")
            return data
        if self.length is not None and self._egress_read + self.length > cap:
            self.close()
            raise urllib.error.URLError(f"{REFUSED_SIZE}: Content-Length {self.length} over the {cap}-byte cap")
        chunks, total = [], self._egress_read
        while True:  # bounded chunks: never preallocate the whole cap
            chunk = super().read(min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                self.close()
                raise urllib.error.URLError(f"{REFUSED_SIZE}: more than {cap} bytes")
        self._egress_read = total
        data = b"".join(chunks)
        check_image_pixels(data, policy.max_pixels)
        return data


def check_image_pixels(data: bytes, max_pixels: int) -> None:
    """Raise URLError(REFUSED_BOMB ...) if `data` is an image Pillow can read the header of
    and it declares more than `max_pixels` pixels; anything else passes (cv2 decides)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:  # Pillow's own check: over 2x Image.MAX_IMAGE_PIXELS
        found = re.search(r"\((\d+) pixels\)", str(err))
        declared = f"{int(found.group(1)) / 1e6:.1f} MP" if found else str(err)
        raise urllib.error.URLError(f"{REFUSED_BOMB}: {declared} over the {max_pixels / 1e6:g} MP limit") from None
    except Exception:  # not an image Pillow knows: leave it to the decoder  # noqa: BLE001
        return
    if width * height > max_pixels:
        raise urllib.error.URLError(
            f"{REFUSED_BOMB}: {width}x{height}, {width * height / 1e6:.1f} MP over the {max_pixels / 1e6:g} MP limit"
        )


class _GuardMixin:
    response_class = GuardedHTTPResponse

    def __init__(self, *args, policy: EgressPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._egress_policy = policy
        self._create_connection = functools.partial(guarded_create_connection, policy)

    def getresponse(self):
        response = super().getresponse()
        if isinstance(response, GuardedHTTPResponse):
            response._egress_policy = self._egress_policy
        return response


class GuardedHTTPConnection(_GuardMixin, http.client.HTTPConnection):
    """HTTPConnection whose connect resolves, checks and connects to the checked address."""


class GuardedHTTPSConnection(_GuardMixin, http.client.HTTPSConnection):
    """Same for HTTPS; SNI and the certificate check still use the URL's hostname (self.host)."""


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: EgressPolicy, debuglevel=0):
        super().__init__(debuglevel)
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPConnection, policy=self.policy), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: EgressPolicy, debuglevel=0, context=None):
        super().__init__(debuglevel, context=context)
        self.policy = policy

    def https_open(self, req):
        kwargs = {"context": self._context}
        if sys.version_info < (3, 12):
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(functools.partial(GuardedHTTPSConnection, policy=self.policy), req, **kwargs)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http/https (each hop is then checked by the handlers above)."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urljoin(req.full_url, location.strip())
            if urlparse(target).scheme.lower() not in ("http", "https"):
                fp.close()
                raise urllib.error.URLError(f"{REFUSED_REDIRECT} {target!r} (from {req.full_url})")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class RefuseOtherSchemes(urllib.request.BaseHandler):
    handler_order = 10_000  # after every real handler had its chance

    def unknown_open(self, req):
        raise urllib.error.URLError(f"{REFUSED_SCHEME} {req.type!r}: {req.full_url}")


def build_opener(
    allow_loopback: bool = False,
    allow_private: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    *,
    max_response_bytes: int | None = None,
    ssl_context=None,
) -> urllib.request.OpenerDirector:
    """An opener for http/https only (file: too when allow_loopback), guarded as above."""
    policy = EgressPolicy(allow_loopback, allow_private, max_megapixels, max_response_bytes)
    return opener_for_policy(policy, ssl_context=ssl_context)


def opener_for_policy(policy: EgressPolicy, ssl_context=None) -> urllib.request.OpenerDirector:
    """`build_opener` for a given policy object (whose `allows(ip)` decides each address)."""
    opener = urllib.request.OpenerDirector()
    handlers = [
        urllib.request.ProxyHandler({}),  # no proxies: the proxy would resolve the host, not us
        GuardedHTTPHandler(policy),
        GuardedHTTPSHandler(policy, context=ssl_context),
        urllib.request.HTTPDefaultErrorHandler(),
        GuardedRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        RefuseOtherSchemes(),
    ]
    if policy.allow_loopback:
        handlers.append(urllib.request.FileHandler())
    for handler in handlers:
        opener.add_handler(handler)
    opener.egress_policy = policy  # type: ignore[attr-defined]
    return opener


# ---------------------------------------------------------------------------------------
# Installing it in a process
# ---------------------------------------------------------------------------------------


def env_for(
    allow_loopback: bool = False,
    allow_private: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_response_bytes: int | None = None,
) -> dict[str, str]:
    """Environment for a downloading process (Ray runtime_env env_vars, a child's env):
    `install_from_env()` reads it back, and OpenCV reads its pixel limit from it at import."""
    env = {
        ENV_ALLOW_LOOPBACK: "1" if allow_loopback else "0",
        ENV_ALLOW_PRIVATE: "1" if allow_private else "0",
        ENV_MAX_MEGAPIXELS: repr(float(max_megapixels)),
        ENV_OPENCV_MAX_PIXELS: str(int(max_megapixels * 1e6)),
    }
    if max_response_bytes is not None:
        env[ENV_MAX_RESPONSE_BYTES] = str(int(max_response_bytes))
    return env


def install(
    allow_loopback: bool = False,
    allow_private: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_response_bytes: int | None = None,
) -> None:
    """Install the guarded opener as urllib's global opener in THIS process and set the
    pixel limits (Pillow's now; OpenCV's only if cv2 is imported after this)."""
    env = env_for(allow_loopback, allow_private, max_megapixels, max_response_bytes)
    previous_cv2_limit = os.environ.get(ENV_OPENCV_MAX_PIXELS)
    os.environ.update(env)  # children (spawn, subprocess) inherit it
    if "cv2" in sys.modules and previous_cv2_limit != env[ENV_OPENCV_MAX_PIXELS]:
        log.warning(
            "cv2 was imported before %s=%s was set: OpenCV keeps its old pixel limit in this "
            "process (the opener's image-header check still applies); set it in the "
            "environment before the process starts (egress.env_for)",
            ENV_OPENCV_MAX_PIXELS,
            env[ENV_OPENCV_MAX_PIXELS],
        )
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = int(max_megapixels * 1e6)
    except ImportError:  # pragma: no cover
        pass
    urllib.request.install_opener(
        build_opener(allow_loopback, allow_private, max_megapixels, max_response_bytes=max_response_bytes)
    )


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def install_from_env() -> None:
    """`install()` configured by the T2I_* environment variables (defaults: refuse loopback and
    private addresses, 89 MP). Usable as a Ray `worker_process_setup_hook`."""
    max_bytes = os.environ.get(ENV_MAX_RESPONSE_BYTES)
    install(
        allow_loopback=_env_bool(ENV_ALLOW_LOOPBACK),
        allow_private=_env_bool(ENV_ALLOW_PRIVATE),
        max_megapixels=float(os.environ.get(ENV_MAX_MEGAPIXELS) or DEFAULT_MAX_MEGAPIXELS),
        max_response_bytes=int(max_bytes) if max_bytes else None,
    )


def installed_policy() -> EgressPolicy | None:
    """The policy of the guard installed in this process, or None if urllib's opener is another."""
    return getattr(urllib.request._opener, "egress_policy", None)


def uninstall() -> None:
    """Back to urllib's default opener (built lazily by the next urlopen)."""
    urllib.request.install_opener(None)
