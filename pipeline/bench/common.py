"""What the benches share: progress lines, a stopwatch, torch's thread count, a private Ray, peak
memory and how ratios are reported.

A bench's `run_bench(cpus=..., ...)` returns one dict, which `pipeline bench NAME` prints as the
last line of stdout (JSON); progress goes to stderr, so stdout holds nothing else.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

from pipeline.core.config import RayConfig
from pipeline.core.log import get_logger

# The tiny preset's shard size (ingest.samples_per_shard): the encode and train benches cut shards of
# at most this many samples, so that a small bench still has several.
SAMPLES_PER_SHARD = 500


def logger(bench: str) -> Callable[[str], None]:
    """A function that logs `message` as the bench NAME (`pipeline bench` sets up the console)."""
    return get_logger(f"bench.{bench}").info


class Stopwatch:
    """Wall-clock seconds (`time.perf_counter`) since it was made or its `with` block began; frozen
    when the block ends."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stopped: float | None = None

    def __enter__(self) -> Stopwatch:
        self.started, self.stopped = time.perf_counter(), None
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which starts afresh at exec. getrusage's
    ru_maxrss keeps the parent's RSS at fork across the exec, so a bench's child would report its
    parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    raise KeyError("VmHWM")


def ratio(value: float, baseline: float) -> float:
    """`value / baseline` as every bench reports a ratio: to 3 decimals."""
    return round(value / baseline, 3)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block, restored after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Ray as `ensure_ray` starts (or joins) it, shut down after the block if the block started it."""
    import ray

    from pipeline.core.ray_runtime import ensure_ray

    started_ray = not ray.is_initialized()
    ensure_ray(config)
    try:
        yield
    finally:
        if started_ray:
            ray.shutdown()


class PeakMemory:
    """Peak summed RSS of this process and its Ray worker descendants, sampled on a thread.

    Only descendants count, so another user's or another run's Ray on the same machine does
    not. RSS counts shared pages (Ray's object store) once per process that maps them: the
    figure is an upper bound, good for comparing two runs of the same bench. With RAY_ADDRESS
    set, `ensure_ray` joins that cluster, whose workers are not descendants: only the driver counts.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        driver = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, _rss(driver) + sum(_rss(worker) for worker in _ray_workers(driver)))
            if self._stop.wait(self.interval_s):
                return


def _ray_workers(driver: psutil.Process) -> list[psutil.Process]:
    workers = []
    for process in driver.children(recursive=True):
        try:
            if any("ray::" in part for part in process.cmdline()):
                workers.append(process)
        except psutil.Error:  # exited between listing and reading
            pass
    return workers


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0
