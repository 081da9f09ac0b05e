"""Fixtures of the sample-stage tests; the helpers they use live in sample_support.py."""

import pytest
import torch
from sample_support import clip_dir, model_dirs, synthetic_run  # noqa: F401  (pytest fixtures)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from two threads, and on a shared 2-core machine OpenMP's
    spin-waiting makes them 10-100x slower under load; restored afterwards for other packages."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
