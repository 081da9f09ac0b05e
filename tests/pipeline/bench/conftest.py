"""Fixtures of the bench tests: the sample bench reads the same synthetic run as the sample-stage tests."""

from sample_support import model_dirs, synthetic_run  # noqa: F401  (pytest fixtures)
