"""Joining or starting Ray, the same way for the CLI, `ray job submit` and tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pipeline.core import faults, log, trackers
from pipeline.core.config import RayConfig

# Environment every Ray worker needs: img2dataset imports albumentations, which otherwise
# tries to reach the internet; tokenizers' thread pool deadlocks after fork.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_ray(config: RayConfig) -> None:
    """Connect to config.address or RAY_ADDRESS if set, else start a private local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)
    log.quiet_ray_driver()
    address = config.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {
        "env_vars": {**WORKER_ENV, **faults.environment(), **log.worker_env(), **trackers.environment()},
        "worker_process_setup_hook": log.WORKER_SETUP_HOOK,
    }
    if address:
        # A cluster on 127.0.0.1 (local tests, a port-forward) is only reachable there: Ray would
        # otherwise rewrite the address to the node IP and wait for a GCS that is not listening.
        loopback = address.split("://")[-1].startswith(("127.", "localhost"))
        with _loopback_only() if loopback else contextlib.nullcontext():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local" never joins someone else's `ray start` cluster by accident; no dashboard
        # (nor its job API); loopback only (see _loopback_only).
        with _loopback_only():
            ray.init(
                address="local",
                num_cpus=config.num_cpus,
                include_dashboard=False,
                runtime_env=runtime_env,
                log_to_driver=True,
            )
    log.route_worker_output()


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's servers (GCS, raylet, workers, agents) listen on the node IP, the machine's network
    address, unless Ray clusters are off (as on macOS): then on 127.0.0.1. The processes ray.init
    starts read the variable; this one read it at import, hence the constant too."""
    from ray._private import ray_constants

    saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:  # a later ray.init(address=...) in this process must report its real address
        if saved[0] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
