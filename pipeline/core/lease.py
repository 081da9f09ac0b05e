"""One driver per run directory: a lease object, `RUN/driver.lease`, with its owner and a heartbeat.

Two drivers on one run would race on run.json and start the same stage twice. The driver takes the
lease before it writes anything and renews it every HEARTBEAT_S seconds from a daemon thread; a second
driver is refused with a message naming the first (host, pid, command, last heartbeat). A lease is
abandoned, and taken over, when its heartbeat is older than EXPIRES_S, or at once when its process is
gone from this host (a killed driver rerun at once must not wait out the heartbeat).

Taking it is write-then-read-back: on a local disk the first lease is created exclusively; on an
object store two drivers starting within the same moment could both write, and the read-back leaves
only the one whose lease the store kept (the last write): the other is refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from pipeline.core import layout
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

HEARTBEAT_S = 10.0
EXPIRES_S = 90.0  # nine missed heartbeats: allows for a slow store and clocks a little apart


class LeaseHeld(RuntimeError):
    """Another driver holds the run's lease."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease (one driver process) and when it last renewed it."""

    token: str  # unique per driver: the read-back compares it
    host: str
    pid: int
    process_started: float  # the process's start time: a reused pid is not the holder
    command: str
    taken: float  # unix time
    heartbeat: float

    def describe(self, now: float) -> str:
        return (
            f"pid {self.pid} on {self.host} (`{self.command}`), which took it at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.taken))}; "
            f"its last heartbeat was {max(0.0, now - self.heartbeat):.0f} s ago"
        )


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def abandoned(holder: Holder, now: float, host: str | None = None) -> bool:
    """Is `holder`'s lease free to take: no heartbeat for EXPIRES_S, or its process gone from this host?"""
    if now - holder.heartbeat > EXPIRES_S:
        return True
    if holder.host != (host or socket.gethostname()):
        return False  # another host's process: only its heartbeat can tell
    started = _process_started(holder.pid)
    return started is None or abs(started - holder.process_started) > 1.0


class Lease:
    """`with Lease(run, command):` holds the run's lease for the block; LeaseHeld if another driver does."""

    def __init__(self, run: RunDir, command: str = "pipeline"):
        now = time.time()
        pid = os.getpid()
        self.run = run
        self.holder = Holder(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=pid,
            process_started=_process_started(pid) or now,
            command=command,
            taken=now,
            heartbeat=now,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the heartbeat found the lease taken by another driver

    # reading and writing -----------------------------------------------------------------
    def read(self) -> Holder | None:
        """The lease on record, or None (none, or unreadable: a torn write is treated as none)."""
        try:
            return Holder(**json.loads(self.run.read_text(layout.LEASE)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            get_logger("lease").warning(f"{self.run.path(layout.LEASE)} is unreadable ({error}); taking it")
            return None

    def _write(self, holder: Holder) -> None:
        self.run.write_text(layout.LEASE, json.dumps(asdict(holder)) + "\n")

    def _create(self) -> bool:
        """Write the first lease; False if one appeared meanwhile (exclusive on a local disk)."""
        if not self.run.is_local:
            self._write(self.holder)
            return True
        path = self.run.path(layout.LEASE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(asdict(self.holder)) + "\n")
        return True

    # taking and giving back --------------------------------------------------------------
    def acquire(self) -> Lease:
        current = self.read()
        now = time.time()
        if current is not None and current.token != self.holder.token and not abandoned(current, now):
            raise LeaseHeld(self._refusal(current, now))
        if current is None:
            if not self._create():
                return self.acquire()  # another driver created it first: judge that one
        else:
            get_logger("lease").warning(f"taking over the lease of {current.describe(now)}")
            self._write(self.holder)
        kept = self.read()
        if kept is None or kept.token != self.holder.token:
            if kept is None:
                raise LeaseHeld(f"{self.run.path(layout.LEASE)} vanished while this driver took it; another driver is starting")
            raise LeaseHeld(self._refusal(kept, time.time()))
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, holder: Holder, now: float) -> str:
        return (
            f"another driver holds {self.run.url}: {holder.describe(now)}. Two drivers on one run directory "
            f"would overwrite each other's run.json. Wait for it to finish, stop it, or use another --out; a lease "
            f"without a heartbeat for {EXPIRES_S:.0f} s is taken over (at once when its process is gone from this host)."
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.renew():
            pass

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and `lost` says why) once another driver holds the lease."""
        try:
            current = self.read()
            if current is not None and current.token != self.holder.token:
                self.lost = f"another driver took the lease: {current.describe(time.time())}"
                get_logger("lease").error(f"{self.run.url}: {self.lost}; this driver's writes may now collide with it")
                return False
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            self._write(self.holder)
        except OSError as error:  # a full or flaky store: the stage will meet it too; keep trying
            get_logger("lease").warning(f"could not renew {self.run.path(layout.LEASE)}: {error}")
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 30)
        try:
            current = self.read()
            if current is not None and current.token == self.holder.token:
                self.run.remove(layout.LEASE)
        except OSError as error:
            get_logger("lease").warning(f"could not give back {self.run.path(layout.LEASE)}: {error}")

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
