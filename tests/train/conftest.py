"""Fixtures for the train tests: a run directory whose encode stage is done."""

from __future__ import annotations

import pytest
from sample_support import model_dirs  # noqa: F401  (a pytest fixture: tiny foreign encoders for export tests)
from synthetic_latents import write_latent_run

from pipeline.core.rundir import RunDir


@pytest.fixture
def latent_run(tmp_path) -> RunDir:
    return write_latent_run(tmp_path / "run")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 cores shared with other jobs, more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
