"""Reading latent shards: the encode manifest, one shard's samples, and batches of them.

The encode stage writes `RUN/encode/shards/*.tar` (webdataset: KEY.latent.npy, KEY.text.npy,
KEY.json, and with the encode options the posterior's std, a mirrored copy and the class label
KEY.cls: see `pipeline.core.layout`) and `encode/manifest.json`, whose `latent_shards` lists each
raw shard's parts and sample counts. Training plans its order from those counts alone
(`train.order`) and streams only the shards its batches need (`train.stream`); `load_latent_data`
reads every shard into memory, for tests and benchmarks.

A raw shard reads as its parts merged, samples sorted by key (per bucket with encode.buckets), so
the same latents give the same order however encode split them. Index i of a shard is its i-th
sample counting bucket by bucket in bucket-name order. A sample counted by encode that proves
unusable on reading (damaged since, or non-finite) is replaced by another of the same shard and
bucket, and counted: every rank still takes a full batch in step with the others.

Flip choices and posterior draws come from the batch's own generator (`assemble`), so they too
are recomputed, not stored, on resume. Arrays are read with `allow_pickle=False` and metadata as
JSON: no pickle ever runs.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core import layout
from pipeline.core.arrays import from_base64_npy, from_npy_bytes
from pipeline.core.rundir import RunDir
from train.order import ShardCounts

# webdataset's rule: the key is the path up to the first dot of the file name.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


@dataclass
class LatentShard:
    """Samples of one shard and bucket (fp16): text embeddings [n, 77, D] and, by member name,
    latents [n, 4, h, w] (`layout.LATENT_KEY`, plus the std and flipped members if encoded)."""

    name: str
    latents: dict[str, np.ndarray]
    text_embeddings: np.ndarray
    incomplete_samples: int = 0  # a member missing, unreadable, non-finite or of the wrong shape
    truncated: bool = False  # the tar ended early; the samples before the damage are kept
    keys: tuple[str, ...] = ()  # one per sample, in order
    bucket: str | None = None  # with encode.buckets: the bucket (WxH) all its samples belong to
    class_labels: np.ndarray | None = None  # [n] int64 class indices, when the manifest lists classes

    def __len__(self) -> int:
        return len(self.text_embeddings)


@dataclass(frozen=True)
class ShardEntry:
    """One latent shard of the manifest's `latent_shards`: its tar (or, in runs before one latent shard per
    raw shard, its parts) and counts."""

    name: str
    parts: tuple[str, ...]
    counts: ShardCounts


@dataclass(frozen=True)
class LatentSpec:
    """What the encode manifest says training needs: shapes, members, classes and the shard table."""

    shards: tuple[ShardEntry, ...]
    empty_caption_embedding: np.ndarray  # [77, D] fp16
    latent_shape: tuple[int, ...]  # [4, h, w]
    text_embedding_shape: tuple[int, ...]  # [77, D]
    latent_members: tuple[str, ...] = (layout.LATENT_KEY,)
    bucket_latent_shapes: dict[str, tuple[int, ...]] | None = None  # encode.buckets: bucket -> latent shape
    classes: list[str] | None = None  # class names in label order (encode.class_field); None: no labels
    class_field: str | None = None

    @property
    def bucketed(self) -> bool:
        return self.bucket_latent_shapes is not None

    @property
    def shard_counts(self) -> tuple[ShardCounts, ...]:
        return tuple(entry.counts for entry in self.shards)

    @property
    def cross_attention_dim(self) -> int:
        return self.text_embedding_shape[-1]

    @property
    def sample_size(self) -> int:
        return self.latent_shape[-1]

    @property
    def flip_copies(self) -> bool:
        return layout.LATENT_FLIP_KEY in self.latent_members

    @property
    def stores_distribution(self) -> bool:
        return layout.LATENT_STD_KEY in self.latent_members

    @property
    def class_count(self) -> int | None:
        return None if self.classes is None else len(self.classes)


@dataclass
class LoadedShard:
    """One latent shard read whole: its usable samples per bucket ("" without buckets)."""

    entry: ShardEntry
    by_bucket: dict[str, LatentShard]
    incomplete_samples: int = 0
    truncated: bool = False

    @property
    def usable(self) -> int:
        return sum(len(part) for part in self.by_bucket.values())

    @property
    def replaced(self) -> int:
        """Counted samples this shard no longer yields (each is replaced by another of its bucket)."""
        return max(self.entry.counts.samples - self.usable, 0)

    def locate(self, index: int) -> tuple[LatentShard, int]:
        """The samples and row that index `index` of the shard reads (see the module docstring)."""
        buckets = self.entry.counts.buckets or (("", self.entry.counts.samples),)
        for bucket, count in buckets:
            if index < count:
                part = self.by_bucket.get(bucket)
                if part is None or len(part) == 0:
                    raise ValueError(
                        f"latent shard {self.entry.name} ({', '.join(self.entry.parts)}): encode counted {count} sample(s)"
                        f"{' of bucket ' + bucket if bucket else ''} but none is readable now; encode it again"
                    )
                return part, index % len(part)
            index -= count
        raise IndexError(f"latent shard {self.entry.name} has {self.entry.counts.samples} samples, not {index + 1}+")


def assemble(
    rows: list[tuple[LatentShard, int]], spec: LatentSpec, generator: torch.Generator | None = None, pin: bool = False
) -> dict[str, torch.Tensor]:
    """Stack (samples, row) pairs into tensors: `latents` and `text_embeddings` fp16 (cast on the
    device, not here), `class_labels` with classes.

    With flip copies each sample takes its mirrored latent with probability 0.5; with stored
    distributions its latent is drawn as mean + std * noise (then fp32). Both come from
    `generator` (flips first, then noise), so a batch is a pure function of (rows, generator
    state), which is what makes resume exact. Without either option nothing is drawn. `pin`
    collates into page-locked memory, for non-blocking copies to a GPU.
    """
    flipped = (torch.rand(len(rows), generator=generator) < 0.5).tolist() if spec.flip_copies else [False] * len(rows)
    latents = _stack([part.latents[_member(layout.LATENT_KEY, flip)][row] for (part, row), flip in zip(rows, flipped)], pin)
    if spec.stores_distribution:
        std = _stack([part.latents[_member(layout.LATENT_STD_KEY, flip)][row] for (part, row), flip in zip(rows, flipped)])
        latents = latents.float() + std.float() * torch.randn(latents.shape, generator=generator)
    batch = {"latents": latents, "text_embeddings": _stack([part.text_embeddings[row] for part, row in rows], pin)}
    if spec.classes is not None:
        batch["class_labels"] = torch.tensor([int(part.class_labels[row]) for part, row in rows])
    return batch


def _member(member: str, flipped: bool) -> str:
    return (
        {layout.LATENT_KEY: layout.LATENT_FLIP_KEY, layout.LATENT_STD_KEY: layout.LATENT_FLIP_STD_KEY}[member]
        if flipped
        else member
    )


def _stack(arrays: list[np.ndarray], pin: bool = False) -> torch.Tensor:
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.float16, pin_memory=pin)
    np.stack(arrays, out=out.numpy())
    return out


@dataclass
class LatentData:
    """Every latent shard in memory (tests and benchmarks; training streams them: `train.stream`)."""

    spec: LatentSpec
    shards: list[LoadedShard]

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(entry.counts.samples for entry in self.spec.shards)

    def batch(self, samples: list[tuple[int, int]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`assemble` of (shard, index) pairs."""
        return assemble([self.shards[shard].locate(index) for shard, index in samples], self.spec, generator)

    def counts(self) -> dict[str, int]:
        return read_counts(self.shards)


def read_counts(shards: list[LoadedShard]) -> dict[str, int]:
    """What reading these shards found: shards, usable samples, and what was damaged."""
    return {
        "shards": len(shards),
        "samples": sum(shard.usable for shard in shards),
        "incomplete_samples": sum(shard.incomplete_samples for shard in shards),
        "truncated_shards": sum(shard.truncated for shard in shards),
        "replaced_samples": sum(shard.replaced for shard in shards),
    }


def manifest_latent_members(manifest: dict) -> tuple[str, ...]:
    """The latent members every sample holds, from the manifest's flags.

    Manifests older than these options lack the flags: mode latents, no flipped copies.
    """
    storage = manifest.get("latent_storage", "mode")
    if storage not in ("mode", "distribution"):
        raise ValueError(f"{layout.ENCODE_MANIFEST}: unknown latent_storage {storage!r}")
    distribution, flips = storage == "distribution", bool(manifest.get("flip_copies", False))
    members = [layout.LATENT_KEY] + ([layout.LATENT_STD_KEY] if distribution else [])
    if flips:
        members += [layout.LATENT_FLIP_KEY] + ([layout.LATENT_FLIP_STD_KEY] if distribution else [])
    listed = manifest.get("members")
    if listed is not None and set(listed) != set(members):
        raise ValueError(
            f"{layout.ENCODE_MANIFEST} lists latent members {listed}, but its flags (latent_storage "
            f"{storage!r}, flip_copies {flips}) mean {members}"
        )
    return tuple(members)


def read_spec(run: RunDir) -> LatentSpec:
    """The encode manifest of `run`, checked, as a `LatentSpec`; raises naming the file if it cannot feed training."""
    where = run.path(layout.ENCODE_MANIFEST)
    if not run.exists(layout.ENCODE_MANIFEST):
        raise FileNotFoundError(f"{where} is missing: run the encode stage first")
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    latent_shape, text_shape = tuple(manifest["latent_shape"]), tuple(manifest["text_embedding_shape"])
    empty = from_base64_npy(manifest["empty_caption_embedding"])
    if tuple(empty.shape) != text_shape:
        raise ValueError(f"{where}: empty_caption_embedding has shape {list(empty.shape)}, expected {list(text_shape)}")
    if "latent_shards" not in manifest:
        raise ValueError(
            f"{where} has no per-shard sample counts (latent_shards), which training plans its order from: run the "
            "encode stage again (it keeps every encoded shard and rewrites the manifest)"
        )
    bucket_shapes = manifest.get("bucket_latent_shapes") if manifest.get("buckets") else None
    entries = tuple(_shard_entry(entry, bucket_shapes is not None, where) for entry in manifest["latent_shards"])
    if not entries:
        raise FileNotFoundError(f"{where} lists no latent shard: encode wrote nothing to train on")
    return LatentSpec(
        shards=entries,
        empty_caption_embedding=empty.astype(np.float16),
        latent_shape=latent_shape,
        text_embedding_shape=text_shape,
        latent_members=manifest_latent_members(manifest),
        bucket_latent_shapes=None if bucket_shapes is None else {name: tuple(shape) for name, shape in bucket_shapes.items()},
        classes=manifest.get("classes"),
        class_field=manifest.get("class_field"),
    )


def _shard_entry(entry: dict, bucketed: bool, where: str) -> ShardEntry:
    buckets = tuple(sorted((str(name), int(count)) for name, count in entry.get("buckets", {}).items() if count))
    if bucketed and sum(count for _, count in buckets) != entry["samples"]:
        raise ValueError(f"{where}: latent shard {entry['name']}'s bucket counts do not add up to its {entry['samples']} samples")
    # One latent shard per raw shard, named by its stem; manifests before that listed parts.
    parts = tuple(entry.get("parts") or (f"{entry['name']}.tar",))
    return ShardEntry(str(entry["name"]), parts, ShardCounts(int(entry["samples"]), buckets))


def read_shard(run: RunDir, spec: LatentSpec, entry: ShardEntry) -> LoadedShard:
    """One latent shard: its parts read and merged, by bucket."""
    wanted = {*spec.latent_members, layout.TEXT_EMBEDDING_KEY, *([layout.CLASS_KEY] if spec.classes is not None else [])}
    shape_bucket = {shape: name for name, shape in (spec.bucket_latent_shapes or {"": spec.latent_shape}).items()}
    rows: dict[str, list[tuple[str, dict]]] = {}
    incomplete, truncated = 0, False
    for part in entry.parts:
        with run.open_read(f"{layout.ENCODE_SHARDS}/{part}") as handle:
            samples, cut = read_tar_members(handle, wanted)
        truncated |= cut
        for key, members in samples.items():
            bucket = shape_bucket.get(_latent_shape(members)) if spec.bucketed else ""
            shape = spec.bucket_latent_shapes[bucket] if spec.bucketed and bucket is not None else spec.latent_shape
            arrays = (
                None
                if bucket is None
                else decode_sample(members, spec.latent_members, shape, spec.text_embedding_shape, spec.class_count)
            )
            if arrays is None:
                incomplete += 1
            else:
                rows.setdefault(bucket, []).append((key, arrays))
    by_bucket = {bucket: _latent_shard(entry.name, bucket, found, spec) for bucket, found in sorted(rows.items())}
    return LoadedShard(entry, by_bucket, incomplete, truncated)


def _latent_shape(members: dict[str, bytes]) -> tuple | None:
    try:
        return from_npy_bytes(members[layout.LATENT_KEY]).shape
    except (KeyError, ValueError, OSError, EOFError):
        return None


def _latent_shard(name: str, bucket: str, rows: list[tuple[str, dict]], spec: LatentSpec) -> LatentShard:
    """Samples sorted by key: however encode's write tasks split a raw shard, the same latents give the same order."""
    rows = sorted(rows, key=lambda row: row[0])
    labels = None if spec.classes is None else np.array([arrays[layout.CLASS_KEY] for _, arrays in rows], dtype=np.int64)
    return LatentShard(
        name=f"{name}:{bucket}" if bucket else name,
        latents={member: np.stack([arrays[member] for _, arrays in rows]) for member in spec.latent_members},
        text_embeddings=np.stack([arrays[layout.TEXT_EMBEDDING_KEY] for _, arrays in rows]),
        keys=tuple(key for key, _ in rows),
        bucket=bucket or None,
        class_labels=labels,
    )


def load_latent_data(run: RunDir) -> LatentData:
    """The encode manifest and every latent shard of `run`, in memory."""
    spec = read_spec(run)
    return LatentData(spec, [read_shard(run, spec, entry) for entry in spec.shards])


def read_latent_shard(
    handle,
    name: str,
    latent_shape: tuple,
    text_shape: tuple,
    members: tuple[str, ...] = (layout.LATENT_KEY,),
    class_count: int | None = None,
) -> LatentShard:
    """Samples of one tar that hold every one of `members` (latent member names) and a text
    embedding, well-shaped and finite, in the order they appear; with `class_count`, also a
    class label in [0, class_count)."""
    wanted = {*members, layout.TEXT_EMBEDDING_KEY, *([layout.CLASS_KEY] if class_count is not None else [])}
    parts_by_key, truncated = read_tar_members(handle, wanted)
    samples = {key: decode_sample(parts, members, latent_shape, text_shape, class_count) for key, parts in parts_by_key.items()}
    complete = [sample for sample in samples.values() if sample is not None]
    labels = None if class_count is None else np.array([s[layout.CLASS_KEY] for s in complete], dtype=np.int64)
    return LatentShard(
        name=name,
        latents={member: _stack_rows([s[member] for s in complete], latent_shape) for member in members},
        text_embeddings=_stack_rows([s[layout.TEXT_EMBEDDING_KEY] for s in complete], text_shape),
        incomplete_samples=len(samples) - len(complete),
        truncated=truncated,
        keys=tuple(key for key, sample in samples.items() if sample is not None),
        class_labels=labels,
    )


def read_tar_members(handle, wanted: set[str]) -> tuple[dict[str, dict[str, bytes]], bool]:
    """({key: {member suffix: bytes}} for the `wanted` suffixes, whether the tar ended early or is damaged).

    Plain ustar members (what webdataset's TarWriter writes) are read straight from the headers,
    several times faster than `tarfile`; an archive with anything else (long names, pax headers,
    compression) goes through `tarfile`.
    """
    data = handle.read()
    try:
        return _plain_tar_members(data, wanted)
    except _NotPlain:
        return _tarfile_members(io.BytesIO(data), wanted)


class _NotPlain(Exception):
    """The archive needs `tarfile`."""


_BLOCK = 512


def _plain_tar_members(data: bytes, wanted: set[str]) -> tuple[dict[str, dict[str, bytes]], bool]:
    parts_by_key: dict[str, dict[str, bytes]] = {}
    view, offset = memoryview(data), 0
    while offset + _BLOCK <= len(data):
        header = data[offset : offset + _BLOCK]
        if header.count(0) == _BLOCK:
            return parts_by_key, False  # the end-of-archive blocks
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0", b"5"):
            raise _NotPlain
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _NotPlain from None  # a damaged header: tarfile says how far the archive is good
        if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise _NotPlain
        start, end = offset + _BLOCK, offset + _BLOCK + size
        if end > len(data):
            return parts_by_key, True
        name = (header[345:500].rstrip(b"\0") + b"/" if header[345] else b"") + header[:100].rstrip(b"\0")
        match = _MEMBER_NAME.match(name.decode("utf-8", "replace"))
        if header[156:157] != b"5" and match and match.group(2) in wanted:
            parts_by_key.setdefault(match.group(1), {})[match.group(2)] = bytes(view[start:end])
        offset = start + -(-size // _BLOCK) * _BLOCK
    return parts_by_key, offset != len(data)  # no end blocks: cut short unless it ends on a member's end


def _tarfile_members(handle, wanted: set[str]) -> tuple[dict[str, dict[str, bytes]], bool]:
    parts_by_key: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, suffix = match.groups()
                if suffix in wanted:
                    parts_by_key.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        return parts_by_key, True
    return parts_by_key, False


def _stack_rows(rows: list[np.ndarray], shape: tuple) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, *shape), np.float16)


def decode_sample(
    parts: dict[str, bytes], members: tuple[str, ...], latent_shape: tuple, text_shape: tuple, class_count: int | None = None
) -> dict[str, np.ndarray] | None:
    """Member name -> fp16 array of one sample (and its class index under CLASS_KEY, with
    `class_count`); None if any member is missing or unusable."""
    arrays: dict = {}
    if class_count is not None:
        try:
            label = int(parts[layout.CLASS_KEY].decode("ascii"))
        except (KeyError, ValueError, UnicodeDecodeError):
            return None
        if not 0 <= label < class_count:
            return None
        arrays[layout.CLASS_KEY] = label
    shapes = {**dict.fromkeys(members, latent_shape), layout.TEXT_EMBEDDING_KEY: text_shape}
    for member, shape in shapes.items():
        try:
            array = from_npy_bytes(parts[member])
        except (KeyError, ValueError, OSError, EOFError):
            return None
        if array.shape != shape or array.dtype.kind != "f" or not np.isfinite(array).all():
            return None
        arrays[member] = array.astype(np.float16, copy=False)  # from_npy_bytes gave a fresh array
    return arrays
