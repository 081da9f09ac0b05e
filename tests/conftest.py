import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A private Ray instance with 2 CPUs for the whole test session, shut down at the end."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()
