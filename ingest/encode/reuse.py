"""Encoding a run at a new resolution, reusing the text embeddings of its previous latents.

A multi-resolution schedule (train at 256 px, then go on at 512 px) encodes every image again, but
a caption's text embedding (and the empty caption's) depends on the caption, the tokenizer and the
text encoder, not on the image size. So when the encode stage finds a manifest of another resolution
(the runner keeps `encode/` for a change of encode.resolution alone), `stash` records what made its
text embeddings in `encode/previous.json` before anything else is touched, and drops its manifest and
progress. The latent tars stay where they are: the decode task of raw shard STEM reads its samples'
text members from `encode/shards/STEM.tar` by key (`attach_text`), the encoder actor runs only the
VAE on those rows (`complete_text`) and then replaces that tar with the new resolution's. A crash at
any point resumes from the record: a tar is replaced atomically, and one already replaced holds the
same text members. Once the new manifest is written `finish` removes the tars no raw shard has any
more, then the record. Nothing is copied or moved. Torch-free: the decode tasks import it.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ingest.encode import progress
from pipeline.core import layout
from pipeline.core.arrays import from_npy_bytes
from pipeline.core.rundir import RunDir

PREVIOUS = layout.ENCODE_PREVIOUS
# The members of a latent sample that depend on the caption alone.
TEXT_MEMBERS = (layout.TEXT_EMBEDDING_KEY,)
# Batch column: does the row carry its text members from the previous latents?
REUSED = "text_reused"
# webdataset's rule (as train.data reads the tars): the key is the path up to the first dot of the file name.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")
# What must be equal for the previous text members to be this encode's.
TEXT_IDENTITY = {"text_encoder": ("id", "subfolder", "weights_sha256"), "tokenizer": ("id", "subfolder", "vocab_sha256")}


def stash(run: RunDir, resolution: int) -> dict[str, Any] | None:
    """The previous latents to reuse (the record of `encode/previous.json`), or None.

    Latents of another resolution under `encode/manifest.json` are recorded first, then their
    manifest and progress are dropped; the tars stay, to be replaced one by one."""
    previous = run.read_json(PREVIOUS) if run.exists(PREVIOUS) else None
    if not run.exists(layout.ENCODE_MANIFEST):
        return previous
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    if manifest.get("resolution", resolution) == resolution:
        return previous  # this resolution is complete; only `finish` may be left to do
    previous = {
        "resolution": manifest.get("resolution"),
        **{kind: manifest.get(kind) or {} for kind in TEXT_IDENTITY},
        "text_embedding_shape": manifest["text_embedding_shape"],
        "empty_caption_embedding": manifest["empty_caption_embedding"],
    }
    run.write_json(PREVIOUS, previous)  # first: from here on a crash resumes from the record
    run.remove(layout.ENCODE_MANIFEST)
    run.remove(layout.ENCODE_PROGRESS)
    return previous


def same_text_encoder(previous: dict[str, Any], records: dict[str, dict[str, Any]]) -> bool:
    """Were the previous text members made by the encoders of `records` (identity records, or their
    name fields alone)? Fields one side lacks are not compared: names come before hashes."""
    return all(
        previous.get(kind, {}).get(key) == records[kind][key]
        for kind, keys in TEXT_IDENTITY.items()
        for key in keys
        if key in records.get(kind, {}) and key in previous.get(kind, {})
    )


def finish(run: RunDir, previous: dict[str, Any] | None, complete: set[str]) -> int:
    """Once the new manifest is written: remove the latent tars whose stem is not in `complete` (left
    from the previous resolution), then the record; how many tars. One listing of the folder."""
    if previous is None:
        return 0
    stale = [name for name in run.list(layout.ENCODE_SHARDS, ".tar") if progress.stem(name) not in complete]
    for name in stale:
        run.remove(f"{layout.ENCODE_SHARDS}/{name}")
    run.remove(PREVIOUS)
    return len(stale)


def forget(run: RunDir) -> None:
    """The previous text members cannot be used: drop them and all that was encoded with them."""
    run.remove(layout.ENCODE_SHARDS)
    run.remove(layout.ENCODE_PROGRESS)
    run.remove(PREVIOUS)


# Decode tasks ------------------------------------------------------------------------------
def read_text_members(run: RunDir, relative: str) -> dict[str, dict[str, np.ndarray]]:
    """Key -> {text member: array} from the latent tar at `relative`, if there is one (whole samples
    only; a damaged tar gives what precedes the damage)."""
    found: dict[str, dict[str, np.ndarray]] = {}
    try:
        with run.open_read(relative) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                match = _MEMBER_NAME.match(member.name)
                if member.isfile() and match and match.group(2) in TEXT_MEMBERS:
                    key, suffix = match.groups()
                    found.setdefault(key, {})[suffix] = from_npy_bytes(archive.extractfile(member).read())
                archive.members = []  # tarfile keeps every header otherwise
    except (tarfile.TarError, EOFError, OSError, ValueError):
        pass  # missing or damaged: those rows go through the text encoder
    return {key: arrays for key, arrays in found.items() if len(arrays) == len(TEXT_MEMBERS)}


def attach_text(
    batch: dict[str, np.ndarray], keys: list[str], reusable: dict[str, dict[str, np.ndarray]], text_shape: list[int]
) -> int:
    """Add the text member columns and REUSED to a decoded batch of samples `keys` (zeros where a key has
    none: every batch gets the same columns, as Ray Data needs); how many rows were attached."""
    batch[REUSED] = np.array([key in reusable for key in keys])
    for member in TEXT_MEMBERS:
        zeros = np.zeros(text_shape, np.float16)
        batch[member] = np.stack([reusable[key][member] if key in reusable else zeros for key in keys]).astype(np.float16)
    return int(batch[REUSED].sum())


# Encoder actors ----------------------------------------------------------------------------
def complete_text(
    batch: dict[str, np.ndarray], captions: list[str], encode: Callable[[list[str]], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The text members of a batch: reused rows as they came, the others through `encode(captions)`.

    Without the REUSED column (nothing to reuse) every caption is encoded."""
    reused = np.asarray(batch[REUSED], bool) if REUSED in batch else np.zeros(len(captions), bool)
    if reused.all():
        return {member: np.asarray(batch[member], np.float16) for member in TEXT_MEMBERS}
    encoded = encode([caption for caption, done in zip(captions, reused) if not done])
    if not reused.any():
        return encoded
    merged = {member: np.array(batch[member], np.float16) for member in TEXT_MEMBERS}
    for member in TEXT_MEMBERS:
        merged[member][~reused] = encoded[member]
    return merged
