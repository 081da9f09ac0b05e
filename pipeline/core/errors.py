"""The error a stage raises for an expected failure, one the user fixes from its message alone."""

from __future__ import annotations


class StageFailure(RuntimeError):
    """An expected failure of a stage (nothing downloaded, nothing encoded, too few samples for a batch)
    whose message says what happened and what to change: the runner records it in run.json, and the
    CLI prints it as one line with exit code 2, not a traceback."""
