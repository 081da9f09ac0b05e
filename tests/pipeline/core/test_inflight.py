"""Bounded scheduling of Ray tasks (pipeline.core.inflight) and the shard progress bar (pipeline.core.shard_bar)."""

import logging

import pytest

from pipeline.core.inflight import bounded
from pipeline.core.shard_bar import ShardBar


def test_bounded_keeps_at_most_limit_in_flight_and_yields_every_result(ray_local):
    ray = ray_local
    square = ray.remote(lambda x: x * x).options(num_cpus=0.1)
    submitted, finished, most = [], [], 0

    def submit(item):
        nonlocal most
        submitted.append(item)
        most = max(most, len(submitted) - len(finished))
        return square.remote(item)

    for item, result in bounded(submit, iter(range(40)), limit=3):
        assert result == item * item
        finished.append(item)
    assert sorted(finished) == list(range(40)) and most == 3


def test_bounded_raises_a_tasks_error_and_refuses_a_limit_below_one(ray_local):
    ray = ray_local

    def fail(x):
        raise ValueError(f"bad item {x}")

    task = ray.remote(fail).options(num_cpus=0.1, max_retries=0)
    with pytest.raises(ray.exceptions.RayTaskError, match="bad item 0"):
        list(bounded(task.remote, [0], limit=2))
    with pytest.raises(ValueError, match="at least 1"):
        list(bounded(task.remote, [0], limit=0))


def test_leaving_on_an_error_stops_the_tasks_still_in_flight(ray_local, tmp_path):
    """A task that fails while others still run (a full disk): those are cancelled, not left running
    after the stage has given up (they would record shards of connection errors once the toy
    server is gone). Each blocked one waits for a file that never comes, so only cancelling ends it."""
    ray = ray_local

    def work(item: int, release: str) -> int:
        import os
        import time

        if item == 0:
            raise OSError(28, "No space left on device")
        while not os.path.exists(release):
            time.sleep(0.05)
        return item

    task = ray.remote(work).options(num_cpus=0.1, max_retries=0)
    refs = []

    def submit(item):
        refs.append(task.remote(item, str(tmp_path / "release")))
        return refs[-1]

    def give_up(item, error):
        raise error

    with pytest.raises(ray.exceptions.RayTaskError, match="No space left"):
        list(bounded(submit, range(3), limit=3, on_error=give_up))
    for ref in refs[1:]:
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=60)


def test_shard_bar_counts_rates_failures_and_logs_every_tenth(caplog):
    logger = logging.getLogger("pipeline.test-bar")
    with (
        caplog.at_level(logging.INFO, logger="pipeline.test-bar"),
        ShardBar(logger, "ingest", total=25, done=5, quiet=True) as bar,
    ):
        for shard in range(20):
            bar.update(10, {"timeout": 1, "http_error": shard % 2, "other": 0})
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 11  # at 6, 8, ..., 24 of 25 (every 2 shards: 10%), then the summary at the end
    assert lines[-1].startswith("25/25 shards, 200 images,") and "ETA" not in lines[-1]
    assert lines[-1].endswith("failed: timeout 20, http_error 10")
    assert "ETA" in lines[0] and lines[0].startswith("6/25 shards, 10 images")
