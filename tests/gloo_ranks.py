"""Real DeepSpeed ranks on gloo for the tests: a test file run as a script once per rank, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(script: str, folder: Path, world: int = 2, timeout: float = 600) -> list[str]:
    """`python script folder` as ranks 0..world-1 of one process group; each rank's output, once all exited 0."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    logs = [folder / f"rank-{rank}.log" for rank in range(world)]
    ranks = []
    for rank, log in enumerate(logs):  # to files: a rank blocked on a full pipe would hang the others
        with open(log, "w") as output:
            environment = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            command = [sys.executable, script, str(folder)]
            ranks.append(subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT))
    for process, log in zip(ranks, logs):
        assert process.wait(timeout=timeout) == 0, log.read_text()[-6000:]
    return [log.read_text() for log in logs]
