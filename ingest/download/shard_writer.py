"""img2dataset's webdataset writer, remembering the first error of its writes.

img2dataset counts a sample as a success before writing it, and prints and swallows an error of
that write; an error closing the tar or the parquet, or writing the stats file, makes
`Downloader` return False, with the error lost. The download task (`distribute._shard_task`)
asks `take_error` after each shard, so that a full or read-only disk fails the stage with the
OSError itself (one line naming the path: `pipeline.runner.storage_error`) instead of counting
a truncated tar as a finished shard, or one failed shard after another.
"""

from __future__ import annotations

import img2dataset.downloader
from img2dataset.writer import WebDatasetSampleWriter

# Shard id -> the first OSError writing it, in this worker process (a Ray worker runs one task at a time).
_errors: dict[int, OSError] = {}
_write_stats = img2dataset.downloader.write_stats


def _checked_write_stats(output_folder, shard_id, *args, **kwargs):
    """img2dataset's write_stats (looked up in its downloader module at each call), recording an OSError."""
    try:
        return _write_stats(output_folder, shard_id, *args, **kwargs)
    except OSError as error:
        _errors.setdefault(shard_id, error)
        raise


class CheckedSampleWriter(WebDatasetSampleWriter):
    """WebDatasetSampleWriter that records its shard's first OSError before raising it."""

    def __init__(self, shard_id, *args, **kwargs):
        _errors.pop(shard_id, None)  # an earlier try's error in this process is not this one's
        img2dataset.downloader.write_stats = _checked_write_stats  # the shard's stats file, written after close()
        try:
            super().__init__(shard_id, *args, **kwargs)
        except OSError as error:
            _errors.setdefault(shard_id, error)
            raise

    def write(self, img_str, key, caption, meta):
        try:
            super().write(img_str, key, caption, meta)
        except OSError as error:
            _errors.setdefault(self.shard_id, error)
            raise

    def close(self):
        try:
            super().close()
        except OSError as error:
            _errors.setdefault(self.shard_id, error)
            raise


def take_error(shard_id: int) -> OSError | None:
    """The first OSError writing `shard_id`'s tar, parquet or stats file in this process since its writer opened, and forget it."""
    return _errors.pop(shard_id, None)


__all__ = ["CheckedSampleWriter", "take_error"]
