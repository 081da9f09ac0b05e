"""The run directory on any fsspec URL, and its manifest `run.json`.

Files are published atomically: on a local filesystem they are written under a temporary
name and renamed; object stores publish a put atomically by themselves. Directories that
must appear whole (checkpoints, exports) carry a commit marker written last.

Other processes and nodes write into the same run, so every read (listing, existence check,
open) first drops what the filesystem cached about that path: s3fs keeps folder listings, and
answers exists/info (a file's size and ETag, checked on open) from them, for good.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core import layout


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def inside(relative: str, where: str = "the run directory") -> str:
    """`relative`, normalised, if it names a path inside the run; else ValueError. Every path the run
    reads, writes or removes passes here: names read from records (shards, parts) cannot reach out."""
    text = str(relative)
    normal = posixpath.normpath(text.replace("\\", "/"))
    if text.startswith("/") or "://" in text or normal == ".." or normal.startswith("../") or "\0" in text:
        raise ValueError(f"{text!r} is not a path inside {where}: refused")
    return normal


class RunDir:
    """One run under `url` (a local path, file://, s3://, ...)."""

    def __init__(self, url: str | os.PathLike):
        url = str(url)
        self.fs, root = fsspec.core.url_to_fs(url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.url = self.root if self.is_local else f"{protocol}://{self.root}"

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    # paths -------------------------------------------------------------------------------
    def path(self, relative: str = "") -> str:
        """Full URL (or absolute local path) of `relative` inside the run."""
        return f"{self.url}/{relative}".rstrip("/") if relative else self.url

    def _fs_path(self, relative: str) -> str:
        return f"{self.root}/{inside(relative, self.url)}".rstrip("/") if relative else self.root

    def _fresh_path(self, relative: str) -> str:
        """`_fs_path`, with the filesystem's cached listings of it and of its parents dropped."""
        path = self._fs_path(relative)
        self.fs.invalidate_cache(path)  # s3fs drops the path and every parent; a no-op locally
        return path

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self._fresh_path(relative))

    def list(self, relative: str, suffix: str = "") -> list[str]:
        """Names (not paths) directly inside `relative`, sorted; [] if it does not exist."""
        folder = self._fresh_path(relative)
        if not self.fs.exists(folder):
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(folder, detail=False)]
        return sorted(name for name in names if name.endswith(suffix) and ".tmp-" not in name)

    def committed_steps(self, relative: str) -> list[int]:
        """Steps of the step-NNNNNNN folders under `relative` whose commit marker exists."""
        steps = []
        for name in self.list(relative):
            step = layout.parse_step(name)
            if step is not None and self.exists(f"{relative}/{name}/{layout.COMMIT_MARKER}"):
                steps.append(step)
        return sorted(steps)

    # reading and writing -----------------------------------------------------------------
    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open(self._fresh_path(relative), "rb") as handle:
            return handle.read()

    def open_read(self, relative: str) -> IO[bytes]:
        """A streaming binary handle (for files too large to hold in memory at once)."""
        return self.fs.open(self._fresh_path(relative), "rb")

    def read_many(self, relatives: list[str]) -> dict[str, bytes]:
        """Several small files at once (concurrently on object stores), by relative path."""
        if not relatives:
            return {}
        paths = {self._fresh_path(relative): relative for relative in relatives}
        found = self.fs.cat(list(paths), on_error="raise")
        return {paths[path]: data for path, data in found.items()}

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_json(self, relative: str, default: Any = None) -> Any:
        if default is not None and not self.exists(relative):
            return default
        return json.loads(self.read_text(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_write(relative) as handle:
            handle.write(data)

    @contextlib.contextmanager
    def open_write(self, relative: str) -> Iterator[IO[bytes]]:
        """A binary handle whose content appears under `relative` only if the block succeeds."""
        target = self._fs_path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if not self.is_local:  # an object store publishes on close; discard() drops the upload
            handle = self.fs.open(target, "wb")
            try:
                yield handle
            except BaseException:
                getattr(handle, "discard", lambda: None)()
                raise
            handle.close()
            return
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            raise

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, value: Any) -> None:
        self.write_text(relative, json.dumps(value, indent=2, sort_keys=False) + "\n")

    def put_dir(self, local_dir: str | os.PathLike, relative: str, shared: dict[str, str] | None = None) -> None:
        """Upload a local folder to `relative`, then write its commit marker last. `shared` maps subfolders of
        `relative` to folders already in the run, put there too before the marker: hard links in a local run
        (no second copy on disk), server-side copies on an object store."""
        target = self._fs_path(relative)
        if self.is_local:
            temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(local_dir, temporary)
            for name, source in (shared or {}).items():
                shutil.copytree(self._fs_path(source), f"{temporary}/{name}", copy_function=_link_or_copy)
            if os.path.exists(target):  # move the old one aside first: a folder is always there
                stale = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                os.replace(target, stale)
                os.replace(temporary, target)
                shutil.rmtree(stale)
            else:
                os.replace(temporary, target)
        else:
            self.fs.put(str(local_dir).rstrip("/") + "/", target, recursive=True)
            for name, source in (shared or {}).items():
                base = self._fresh_path(source)
                files = [path for path in self.fs.find(base) if not path.endswith(f"/{layout.COMMIT_MARKER}")]
                self.fs.copy(files, [f"{target}/{name}/{path[len(base) + 1 :]}" for path in files])
        self.write_text(f"{relative}/{layout.COMMIT_MARKER}", now() + "\n")

    def get_dir(self, relative: str, local_dir: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Path:
        """Local copy of `relative` (the folder itself when the run is local); with `keep`, only the
        files whose path inside the folder it accepts are copied (a rank's part of a checkpoint)."""
        if self.is_local:
            return Path(self._fs_path(relative))
        base = self._fresh_path(relative)
        names = [path[len(base) + 1 :] for path in self.fs.find(base)]
        wanted = [name for name in names if keep is None or keep(name)]
        if wanted:  # one call: concurrent on object stores
            for name in wanted:
                Path(local_dir, name).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get([f"{base}/{name}" for name in wanted], [str(Path(local_dir, name)) for name in wanted])
        return Path(local_dir)

    def makedirs(self, relative: str) -> None:
        self.fs.makedirs(self._fs_path(relative), exist_ok=True)

    def remove(self, relative: str) -> None:
        target = self._fresh_path(relative)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def move(self, relative: str, to: str) -> None:
        """Rename `relative` to `to` inside the run (a server-side copy, then a delete, on object stores)."""
        source, target = self._fresh_path(relative), self._fresh_path(to)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        else:  # file by file: s3fs's recursive mv also copies the folder's own (absent) key
            files = self.fs.find(source)
            if files:
                self.fs.copy(files, [target + name[len(source) :] for name in files])
            self.fs.rm(source, recursive=True)

    # manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return self.read_json(layout.RUN_MANIFEST, default={"stages": {}})

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(name, {"status": "pending"})

    def update_stage(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage's entry of run.json (single writer: the driver)."""
        manifest = self.manifest()
        entry = manifest["stages"].setdefault(name, {"status": "pending"})
        entry.update(fields)
        manifest["updated"] = now()
        self.write_json(layout.RUN_MANIFEST, manifest)
        return entry


# Raw shards: the contract between the ingest stage, which writes them, and encode, which reads them.
def complete_shard_ids(run: RunDir) -> set[int]:
    """Shards with both a stats file and an outcome record. img2dataset writes its stats file even
    when writing the tar failed (a full disk); the download task writes the outcome record last,
    only once the tar holds as many samples as the stats file counts. One listing: no file is read."""
    return _complete_ids(run.list(layout.INGEST_SHARDS))


def complete_shards(run: RunDir) -> list[str]:
    """Names of the complete shards' tars (`complete_shard_ids`): the only raw tars later stages read."""
    names = run.list(layout.INGEST_SHARDS)
    done = _complete_ids(names)
    return [name for name in names if name.endswith(".tar") and name[:-4].isdigit() and int(name[:-4]) in done]


def _complete_ids(names: list[str]) -> set[int]:
    kinds: dict[str, set[str]] = {}
    for name in names:
        for suffix in (layout.SHARD_STATS_SUFFIX, layout.SHARD_OUTCOME_SUFFIX):
            if name.endswith(suffix) and name[: -len(suffix)].isdigit():
                kinds.setdefault(name[: -len(suffix)], set()).add(suffix)
    return {int(stem) for stem, found in kinds.items() if len(found) == 2}


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the filesystem makes one (no second copy on disk), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
