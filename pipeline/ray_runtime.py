"""Joining or starting Ray, the same way for the CLI, `ray job submit` and tests."""

from __future__ import annotations

import os

from pipeline.config import RayConfig

# Environment every Ray worker needs: img2dataset imports albumentations, which otherwise
# tries to reach the internet; tokenizers' thread pool deadlocks after fork.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_ray(config: RayConfig) -> None:
    """Connect to config.address or RAY_ADDRESS if set, else start a private local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)
    address = config.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local" never joins someone else's `ray start` cluster by accident.
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
