"""Progress of a stage that works shard by shard (ingest, encode), readable at 100,000 shards.

A tqdm bar of shards done/total with its ETA, the images per second of this attempt and the
failures so far by reason (the most frequent first); and, for logs that are not a terminal, one
log line every `log_every` of the shards, saying the same. Fed from the counts each shard's task
returns: O(1) per shard on the driver.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping


class ShardBar:
    """`update(images, failures)` once per finished shard; a context manager."""

    def __init__(
        self,
        logger: logging.Logger,
        desc: str,
        total: int,
        done: int = 0,
        log_every: float = 0.1,
        top: int = 3,
        quiet: bool = False,
    ):
        from tqdm import tqdm

        self.logger, self.desc, self.total, self.top = logger, desc, total, top
        self.images, self.initial, self.n = 0, done, done
        self.failures: Counter[str] = Counter()
        self.started = time.monotonic()
        self.step = max(1, round(total * log_every))
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="shard", dynamic_ncols=True, disable=quiet)

    def __enter__(self) -> ShardBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.n > self.initial:
            self.logger.info(self.summary())

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        """'12/40 shards, 5,120 images, 85.3 images/s, ETA 05:10, failed: timeout 12, http_error 3'."""
        finished = self.n - self.initial  # by this attempt: the rate a resumed run will see
        remaining = (self.total - self.n) * (time.monotonic() - self.started) / finished if finished else None
        eta = f", ETA {self.bar.format_interval(remaining)}" if remaining is not None and self.n < self.total else ""
        failed = ", ".join(f"{reason} {count}" for reason, count in self.failures.most_common(self.top))
        return f"{self.n}/{self.total} shards, {self.images:,} images, {self.images_per_s:.1f} images/s{eta}" + (
            f", failed: {failed}" if failed else ""
        )

    def update(self, images: int, failures: Mapping[str, int] | None = None) -> None:
        self.images += images
        self.failures.update({reason: count for reason, count in (failures or {}).items() if count})
        postfix = {"images/s": f"{self.images_per_s:.0f}"}
        postfix.update(dict(self.failures.most_common(self.top)))
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        self.n += 1
        if self.n % self.step == 0 and self.n < self.total:
            self.logger.info(self.summary())
