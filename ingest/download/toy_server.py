"""Serve the toy dataset over loopback HTTP so that img2dataset downloads it as it would LAION."""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd

from pipeline.core import toy


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per image would drown the progress bar
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client gone mid-response (a download task cancelled when the stage gave up) is not an error
        of ours; anything else is still printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `directory` on host:<free port> in a background thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _QuietServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="toy-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_toy_images(
    directory: Path, count: int, size: int, seed: int, colours: list[str] | None = None, aspect_ratios: list[float] | None = None
) -> pd.DataFrame:
    """Draw the toy set as PNG files; returns (file name, caption, `toy.SPEC_COLUMNS`) rows."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (spec, image) in enumerate(toy.generate(count, size, seed, colours, aspect_ratios)):
        name = f"{index:06d}.png"
        (directory / name).write_bytes(toy.to_png_bytes(image))
        rows.append({"file": name, "caption": spec.caption, **{column: getattr(spec, column) for column in toy.SPEC_COLUMNS}})
    return pd.DataFrame(rows)
