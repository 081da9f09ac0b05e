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
- caps the response body (default 32 MB) and reads the image header of the body (Pillow,
  header only) to refuse images over the megapixel limit before anything decodes them;
- gives each request an overall deadline (default 60 s, every redirect hop and every read
  included): a watchdog thread shuts the connection's socket down when it passes, so a server
  that drips a byte every few seconds (each read within the socket timeout) cannot hold a
  download thread for ever.

img2dataset 1.47 downloads with `urllib.request.urlopen(request, timeout=...)`, i.e. through
the global opener, but that is its internal choice: a version that passes an SSL context
(`urlopen(..., context=ctx)`) makes urllib build a fresh, unguarded opener. So `install()` also
replaces `img2dataset.downloader.download_image` (the function its Downloader fetches with)
by `download_image` here, which always opens through the guarded opener, and replaces
`urllib.request.urlopen` by one that keeps any `context=` inside the guard. It checks that
img2dataset still has the function and calls it the way this was tested with
(`IMG2DATASET_TESTED`), and raises otherwise: a changed img2dataset fails loudly, never
silently unguarded.

It also sets OpenCV's pixel limit (`OPENCV_IO_MAX_IMAGE_PIXELS`, which cv2 reads ONCE, when
it is imported: it must be in the environment before the downloading process imports cv2,
e.g. through a Ray runtime_env's env_vars; `env_for()` gives them) and Pillow's
`Image.MAX_IMAGE_PIXELS`.

Every refusal is an `urllib.error.URLError` (img2dataset records `str(err)` as the
sample's error_message) whose text contains one of the phrases below, for accounting.
"""

from __future__ import annotations

import functools
import heapq
import http.client
import inspect
import io
import ipaddress
import itertools
import logging
import os
import re
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
REFUSED_DEADLINE = "refused slow response"
# What cv2 says when OPENCV_IO_MAX_IMAGE_PIXELS stops a decode (img2dataset records it as is).
CV2_PIXEL_LIMIT_MESSAGE = "CV_IO_MAX_IMAGE_PIXELS"

ENV_ALLOW_LOOPBACK = "T2I_EGRESS_ALLOW_LOOPBACK"
ENV_ALLOW_PRIVATE = "T2I_EGRESS_ALLOW_PRIVATE"
ENV_MAX_MEGAPIXELS = "T2I_MAX_MEGAPIXELS"
ENV_MAX_RESPONSE_BYTES = "T2I_MAX_RESPONSE_BYTES"
ENV_REQUEST_DEADLINE = "T2I_REQUEST_DEADLINE_S"
ENV_OPENCV_MAX_PIXELS = "OPENCV_IO_MAX_IMAGE_PIXELS"
DEFAULT_MAX_MEGAPIXELS = 89.0
# A JPEG or PNG of a few thousand pixels a side is well under it; a 89 MP RGBA image (356 MB)
# buffered by 16 download threads is not.
DEFAULT_MAX_RESPONSE_BYTES = 32_000_000
DEFAULT_REQUEST_DEADLINE_S = 60.0
# The img2dataset versions the guard's replacement of `download_image` was tested with (pyproject pins them).
IMG2DATASET_TESTED = ((1, 47), (1, 48))  # >= first, < second

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
    """What the guarded opener lets through."""

    allow_loopback: bool = False
    allow_private: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_response_bytes: int | None = None
    """Largest body read; None: DEFAULT_MAX_RESPONSE_BYTES."""
    request_deadline_s: float | None = None
    """Wall-clock limit of one request, redirects and body included; None: DEFAULT_REQUEST_DEADLINE_S."""

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def body_cap(self) -> int:
        return self.max_response_bytes if self.max_response_bytes is not None else DEFAULT_MAX_RESPONSE_BYTES

    @property
    def deadline_s(self) -> float:
        return self.request_deadline_s if self.request_deadline_s is not None else DEFAULT_REQUEST_DEADLINE_S

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


# ---------------------------------------------------------------------------------------
# The request deadline
# ---------------------------------------------------------------------------------------


class _Watch:
    """One connection's deadline: a duplicate of its socket's descriptor, shut down when it passes."""

    def __init__(self, fd: int, deadline: float, deadline_s: float):
        self.fd: int | None = fd
        self.deadline = deadline
        self.deadline_s = deadline_s
        self.expired = False

    def error(self) -> urllib.error.URLError:
        return deadline_error(self.deadline_s)


def deadline_error(deadline_s: float) -> urllib.error.URLError:
    return urllib.error.URLError(f"{REFUSED_DEADLINE}: no complete answer within the {deadline_s:g} s request deadline")


class _Watchdog:
    """One daemon thread per process that shuts down the sockets whose request deadline passed.

    Shutting the socket down (through a duplicate of its descriptor: an SSL socket made from it
    shares the connection, and a number the request closed meanwhile is never reused under us)
    wakes a read blocked on it, whatever http.client or ssl was doing; the reader then sees
    `expired` and raises the deadline's error instead of returning a short body."""

    def __init__(self):
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._pid = 0

    def watch(self, sock: socket.socket, deadline: float, deadline_s: float) -> _Watch:
        entry = _Watch(os.dup(sock.fileno()), deadline, deadline_s)
        with self._lock:
            if self._pid != os.getpid():  # no thread yet, or forked since (threads do not survive a fork)
                self._heap, self._pid = [], os.getpid()
                threading.Thread(target=self._run, name="egress-deadline", daemon=True).start()
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            self._lock.notify()
        return entry

    def cancel(self, entry: _Watch | None) -> None:
        """The request is done (or failed otherwise): forget its socket."""
        if entry is not None and entry.fd is not None:
            with self._lock:
                self._close(entry)

    @staticmethod
    def _close(entry: _Watch) -> None:
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].fd is None or self._heap[0][0] <= now):
                    _, _, entry = heapq.heappop(self._heap)
                    if entry.fd is not None:
                        entry.expired = True
                        sock, entry.fd = socket.socket(fileno=entry.fd), None  # closes the duplicate when done
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:  # already closed by the peer
                            pass
                        finally:
                            sock.close()
                self._lock.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()
_request = threading.local()


@contextmanager
def request_deadline(seconds: float) -> Iterator[None]:
    """One deadline for every connection this thread opens inside (the redirect hops of one request)."""
    previous = getattr(_request, "deadline", None)
    _request.deadline = (time.monotonic() + seconds, seconds)
    try:
        yield
    finally:
        _request.deadline = previous


# ---------------------------------------------------------------------------------------
# Responses: size cap, decompression bombs, deadline
# ---------------------------------------------------------------------------------------


class GuardedHTTPResponse(http.client.HTTPResponse):
    """Caps the body, refuses images whose header declares more pixels than allowed, and turns
    a read the deadline cut short into the deadline's error."""

    _egress_policy: EgressPolicy | None = None
    _egress_read = 0
    _egress_watch: _Watch | None = None

    def read(self, amt=None):
        try:
            return self._guarded_read(amt)
        except Exception:
            if self._egress_watch is not None and self._egress_watch.expired:
                self.close()
                raise self._egress_watch.error() from None
            raise

    def _check_deadline(self) -> None:
        if self._egress_watch is not None and self._egress_watch.expired:  # the body was cut short
            self.close()
            raise self._egress_watch.error()

    def close(self):
        try:
            super().close()
        finally:
            _WATCHDOG.cancel(self._egress_watch)

    def _guarded_read(self, amt):
        policy = self._egress_policy
        if policy is None:
            return super().read(amt)
        cap = policy.body_cap
        if amt is not None:
            data = super().read(amt)
            self._check_deadline()
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
            self._check_deadline()
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
        # urllib makes one connection per hop: the deadline runs from the request's start
        # (`request_deadline`), or from this hop's when no request set one.
        self._egress_deadline = getattr(_request, "deadline", None) or (time.monotonic() + policy.deadline_s, policy.deadline_s)
        self._egress_watch: _Watch | None = None
        self._create_connection = self._egress_connect  # http.client's __init__ set socket.create_connection

    def _egress_connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        deadline, seconds = self._egress_deadline
        if time.monotonic() >= deadline:
            raise deadline_error(seconds)
        sock = guarded_create_connection(self._egress_policy, address, timeout, source_address)
        self._egress_watch = _WATCHDOG.watch(sock, deadline, seconds)  # before any TLS handshake
        return sock

    def _deadline_passed(self) -> bool:
        return self._egress_watch is not None and self._egress_watch.expired

    def send(self, data):  # also connects (and shakes hands) on the first call
        try:
            return super().send(data)
        except OSError:
            if self._deadline_passed():
                raise self._egress_watch.error() from None
            raise

    _egress_responding = False

    def getresponse(self):
        self._egress_responding = True  # http.client closes the connection here when the response will close
        try:
            response = super().getresponse()
        except Exception:
            if self._deadline_passed():
                raise self._egress_watch.error() from None
            raise
        finally:
            self._egress_responding = False
        if isinstance(response, GuardedHTTPResponse):
            response._egress_policy = self._egress_policy
            response._egress_watch, self._egress_watch = self._egress_watch, None  # the response closes it
        return response

    def close(self):
        try:
            super().close()
        finally:
            if not self._egress_responding:  # the response being made keeps the deadline
                _WATCHDOG.cancel(self._egress_watch)


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
    request_deadline_s: float | None = None,
    ssl_context=None,
) -> urllib.request.OpenerDirector:
    """An opener for http/https only (file: too when allow_loopback), guarded as above."""
    policy = EgressPolicy(allow_loopback, allow_private, max_megapixels, max_response_bytes, request_deadline_s)
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
# What downloads: urllib.request.urlopen and img2dataset's download_image, both through the guard
# ---------------------------------------------------------------------------------------

_ORIGINAL_URLOPEN = urllib.request.urlopen
_installed: dict[str, object] = {}  # "policy", "opener", and "download_image": img2dataset's own


def _installed_opener() -> urllib.request.OpenerDirector:
    opener = _installed.get("opener")
    if opener is None:
        raise RuntimeError("the egress guard is not installed in this process (egress.install)")
    return opener  # type: ignore[return-value]


def guarded_urlopen(url, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *, context=None, cafile=None, capath=None, **_):
    """`urllib.request.urlopen` while the guard is installed: through the guarded opener whatever
    the caller passes. Plain urllib builds a fresh, unguarded opener for `context=` (or cafile);
    here that context only goes to a guarded HTTPS handler."""
    opener = urllib.request._opener  # a guarded one installed since (install_opener) serves, never another
    if getattr(opener, "egress_policy", None) is None:
        opener = _installed_opener()
    if context is None and (cafile or capath):
        import ssl

        context = ssl.create_default_context(cafile=cafile, capath=capath)
    if context is not None:
        opener = opener_for_policy(opener.egress_policy, ssl_context=context)  # type: ignore[attr-defined]
    return opener.open(url, data, timeout)


_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's `download_image` (same arguments, result and messages as 1.47), but
    always through the guarded opener and within the policy's request deadline."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    opener = _installed_opener()
    user_agent = _USER_AGENT
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with request_deadline(opener.egress_policy.deadline_s), opener.open(request, timeout=timeout) as response:  # type: ignore[attr-defined]
            if disallowed_header_directives and is_disallowed(response.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            return key, io.BytesIO(response.read()), None
    except Exception as err:  # noqa: BLE001 - img2dataset records the message and goes on
        return key, None, str(err)


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names a function's code (and the lambdas and functions inside it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _version(text: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", text) + ["0", "0"])[:2]
    return int(major), int(minor)


def guard_img2dataset() -> None:
    """Make img2dataset's Downloader fetch with `download_image` above; raise if this img2dataset
    is not one the replacement was tested with (its fetch function moved, or another version)."""
    try:
        from importlib.metadata import version

        from img2dataset import downloader as module
    except ImportError:  # not installed: nothing here downloads through it
        return
    found = version("img2dataset")
    low, high = IMG2DATASET_TESTED
    problems = []
    if not low <= _version(found) < high:
        problems.append(f"version {found} is outside the tested range >={low[0]}.{low[1]},<{high[0]}.{high[1]}")
    original = _installed.get("download_image") or getattr(module, "download_image", None)
    expected = ["row", "timeout", "user_agent_token", "disallowed_header_directives"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        problems.append(f"img2dataset.downloader.download_image is missing or no longer takes {expected}")
    retry = getattr(module, "download_image_with_retry", None)
    if retry is None or "download_image" not in _code_names(retry.__code__):
        problems.append("download_image_with_retry no longer calls download_image")
    shard = getattr(getattr(module, "Downloader", None), "download_shard", None)
    if shard is None or "download_image_with_retry" not in _code_names(shard.__code__):
        problems.append("Downloader.download_shard no longer calls download_image_with_retry")
    if problems:
        raise RuntimeError(
            "the ingest egress guard cannot vouch for this img2dataset: "
            + "; ".join(problems)
            + ". Check how it fetches now, adapt egress.download_image, run tests/ingest/download/test_egress*.py, "
            "then widen egress.IMG2DATASET_TESTED and the pin in pyproject.toml"
        )
    _installed.setdefault("download_image", original)
    module.download_image = download_image


# ---------------------------------------------------------------------------------------
# Installing it in a process
# ---------------------------------------------------------------------------------------


def env_for(
    allow_loopback: bool = False,
    allow_private: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_response_bytes: int | None = None,
    request_deadline_s: float | None = None,
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
    if request_deadline_s is not None:
        env[ENV_REQUEST_DEADLINE] = repr(float(request_deadline_s))
    return env


def install(
    allow_loopback: bool = False,
    allow_private: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_response_bytes: int | None = None,
    request_deadline_s: float | None = None,
) -> None:
    """Guard every download of THIS process: the guarded opener as urllib's global opener,
    `urllib.request.urlopen` and img2dataset's `download_image` through it (`guard_img2dataset`,
    which raises for an img2dataset it was not tested with), and the pixel limits (Pillow's
    now; OpenCV's only if cv2 is imported after this)."""
    env = env_for(allow_loopback, allow_private, max_megapixels, max_response_bytes, request_deadline_s)
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
    opener = build_opener(
        allow_loopback,
        allow_private,
        max_megapixels,
        max_response_bytes=max_response_bytes,
        request_deadline_s=request_deadline_s,
    )
    urllib.request.install_opener(opener)
    _installed["opener"] = opener
    urllib.request.urlopen = guarded_urlopen
    guard_img2dataset()


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def install_from_env() -> None:
    """`install()` configured by the T2I_* environment variables (defaults: refuse loopback and
    private addresses, 89 MP, 32 MB, 60 s). Usable as a Ray `worker_process_setup_hook`."""
    max_bytes = os.environ.get(ENV_MAX_RESPONSE_BYTES)
    deadline = os.environ.get(ENV_REQUEST_DEADLINE)
    install(
        allow_loopback=_env_bool(ENV_ALLOW_LOOPBACK),
        allow_private=_env_bool(ENV_ALLOW_PRIVATE),
        max_megapixels=float(os.environ.get(ENV_MAX_MEGAPIXELS) or DEFAULT_MAX_MEGAPIXELS),
        max_response_bytes=int(max_bytes) if max_bytes else None,
        request_deadline_s=float(deadline) if deadline else None,
    )


def installed_policy() -> EgressPolicy | None:
    """The policy of the guard installed in this process, or None if urllib's opener is another."""
    return getattr(urllib.request._opener, "egress_policy", None)


def uninstall() -> None:
    """Back to urllib's default opener (built lazily by the next urlopen), urlopen and img2dataset's own download_image."""
    urllib.request.install_opener(None)
    _installed.pop("opener", None)
    urllib.request.urlopen = _ORIGINAL_URLOPEN
    original = _installed.pop("download_image", None)
    if original is not None:
        from img2dataset import downloader as module

        module.download_image = original
