"""Latent shards in memory, and the data order that makes resume exact.

The encode stage writes `RUN/encode/shards/*.tar` (webdataset: KEY.latent.npy, KEY.text.npy,
KEY.json, and with the encode options the posterior's std, a mirrored copy and the class label
KEY.cls: see `pipeline.core.layout`). Every worker reads all of them into memory once (the tiny demo's 3000
samples take ~30 MB) as one shard per raw shard, samples sorted by key; the order in which a
rank visits them is a pure function of (seed, epoch, rank, world size), so a checkpoint needs
only (epoch, next batch index):

1. per epoch, a permutation of the shards seeded by (seed, epoch);
2. shards dealt to ranks round-robin; the remainder (shards % world size) sits the epoch out;
3. inside each shard a shuffle seeded by (seed, epoch, shard);
4. every rank takes the same number of batches: the fewest any rank can fill. What is
   left over is counted (`EpochPlan.samples_dropped`), never silently lost.

Flip choices and posterior draws come from the batch's own generator (`LatentData.batch`),
so they too are recomputed, not stored, on resume.

With encode.buckets, latents come in one shape per bucket: `train.bucket_order` reads them and
deals single-bucket batches instead (same position, same resume).

Arrays are read with `allow_pickle=False` and metadata as JSON: no pickle ever runs.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core import layout
from pipeline.core.arrays import from_base64_npy, from_npy_bytes
from pipeline.core.rundir import RunDir

# webdataset's rule: the key is the path up to the first dot of the file name.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


@dataclass
class LatentShard:
    """One shard's complete samples (fp16): text embeddings [n, 77, D] and, by member name,
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


@dataclass
class LatentData:
    """Everything training reads from the encode stage."""

    shards: list[LatentShard]
    empty_caption_embedding: np.ndarray  # [77, D]
    latent_shape: tuple[int, ...]  # [4, h, w]
    text_embedding_shape: tuple[int, ...]  # [77, D]
    latent_members: tuple[str, ...] = (layout.LATENT_KEY,)
    bucketed: bool = False  # encode.buckets: batch one bucket at a time (train.buckets.BucketOrder)
    classes: list[str] | None = None  # class names in label order (encode.class_field); None: no labels
    class_field: str | None = None

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(shard) for shard in self.shards)

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

    def batch(self, samples: list[tuple[int, int]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stack (shard, index) pairs into float32 tensors `latents` and `text_embeddings`.

        With flip copies each sample takes its mirrored latent with probability 0.5; with stored
        distributions its latent is drawn as mean + std * noise. Both come from `generator`
        (flips first, then noise), so a batch is a pure function of (samples, generator state),
        which is what makes resume exact. Without either option nothing is drawn.
        """
        flipped = self._flip_choices(len(samples), generator)
        latents = self._stack(samples, flipped, layout.LATENT_KEY, layout.LATENT_FLIP_KEY)
        if self.stores_distribution:
            std = self._stack(samples, flipped, layout.LATENT_STD_KEY, layout.LATENT_FLIP_STD_KEY)
            latents = latents + std * torch.randn(latents.shape, generator=generator)
        text = np.stack([self.shards[shard].text_embeddings[index] for shard, index in samples])
        batch = {"latents": latents, "text_embeddings": torch.from_numpy(text.astype(np.float32))}
        if self.classes is not None:
            batch["class_labels"] = torch.tensor([int(self.shards[shard].class_labels[index]) for shard, index in samples])
        return batch

    def _flip_choices(self, count: int, generator: torch.Generator | None) -> list[bool]:
        if not self.flip_copies:
            return [False] * count
        return (torch.rand(count, generator=generator) < 0.5).tolist()

    def _stack(self, samples: list[tuple[int, int]], flipped: list[bool], member: str, flip_member: str) -> torch.Tensor:
        rows = [
            self.shards[shard].latents[flip_member if flip else member][index] for (shard, index), flip in zip(samples, flipped)
        ]
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def counts(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "samples": sum(self.shard_sizes),
            "incomplete_samples": sum(shard.incomplete_samples for shard in self.shards),
            "truncated_shards": sum(shard.truncated for shard in self.shards),
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


def latent_shard_names(run: RunDir, manifest: dict) -> list[str]:
    """The manifest's list of latent tars; older manifests have none: every tar in the folder."""
    if "shards" in manifest:
        return list(manifest["shards"])
    return run.list(layout.ENCODE_SHARDS, suffix=".tar")


def load_latent_data(run: RunDir) -> LatentData:
    """Read the encode manifest and every latent shard of `run`."""
    if not run.exists(layout.ENCODE_MANIFEST):
        raise FileNotFoundError(f"{run.path(layout.ENCODE_MANIFEST)} is missing: run the encode stage first")
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    latent_shape = tuple(manifest["latent_shape"])
    text_shape = tuple(manifest["text_embedding_shape"])
    members = manifest_latent_members(manifest)
    empty = from_base64_npy(manifest["empty_caption_embedding"])
    if tuple(empty.shape) != text_shape:
        raise ValueError(f"empty_caption_embedding has shape {list(empty.shape)}, expected {list(text_shape)}")
    classes = manifest.get("classes")
    names = latent_shard_names(run, manifest)
    if not names:
        raise FileNotFoundError(f"no latent shards (*.tar) under {run.path(layout.ENCODE_SHARDS)}")
    if manifest.get("buckets"):  # encode.buckets: one shard per raw shard and bucket (train.buckets)
        from train.bucket_order import read_bucketed_shards

        shards = read_bucketed_shards(run, names, manifest, text_shape, members, None if classes is None else len(classes))
        return LatentData(
            shards,
            empty.astype(np.float16),
            latent_shape,
            text_shape,
            members,
            True,
            classes=classes,
            class_field=manifest.get("class_field"),
        )
    shards = []
    for raw_shard, parts in sorted(parts_by_raw_shard(names).items()):
        class_count = None if classes is None else len(classes)
        read = [
            read_latent_shard(
                io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}")), name, latent_shape, text_shape, members, class_count
            )
            for name in parts
        ]
        shards.append(merge_by_key(raw_shard, read))
    return LatentData(
        shards,
        empty.astype(np.float16),
        latent_shape,
        text_shape,
        members,
        classes=classes,
        class_field=manifest.get("class_field"),
    )


# Encode names a part `STEM-xxxxxxxx.tar` after the raw shard it came from.
_PART_NAME = re.compile(r"^(.+)-[0-9a-f]{8}\.tar$")


def parts_by_raw_shard(names: list[str]) -> dict[str, list[str]]:
    """Latent tar names grouped by the raw shard they came from (a name that is not a part is its own group)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _PART_NAME.match(name)
        groups.setdefault(match.group(1) if match else name.removesuffix(".tar"), []).append(name)
    return groups


def merge_by_key(name: str, parts: list[LatentShard]) -> LatentShard:
    """One shard of all `parts`' samples, sorted by key.

    How encode's write tasks split and ordered a raw shard's samples varies from run to run
    (and after a resume); sorted by key, the same latents give the same training order.
    """
    keys = [key for part in parts for key in part.keys]
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, int)
    return LatentShard(
        name=name,
        latents={member: np.concatenate([part.latents[member] for part in parts])[order] for member in parts[0].latents},
        text_embeddings=np.concatenate([part.text_embeddings for part in parts])[order],
        incomplete_samples=sum(part.incomplete_samples for part in parts),
        truncated=any(part.truncated for part in parts),
        keys=tuple(keys[index] for index in order),
        class_labels=None if parts[0].class_labels is None else np.concatenate([part.class_labels for part in parts])[order],
    )


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
    """({key: {member suffix: bytes}} for the `wanted` suffixes, whether the tar ended early)."""
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
        arrays[member] = array.astype(np.float16)
    return arrays


# -- data order ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPosition:
    """Where a batch sits in the order, and the (shard, index) pairs it holds."""

    epoch: int
    index: int
    samples: list[tuple[int, int]] = field(repr=False)


@dataclass(frozen=True)
class EpochPlan:
    shards_by_rank: list[list[int]]
    shards_dropped: list[int]
    steps: int  # batches every rank takes this epoch
    samples_dropped: int  # samples no rank sees this epoch (dropped shards and uneven tails)


@dataclass(frozen=True)
class DataOrder:
    """The recomputable order of batches for every rank (see the module docstring)."""

    shard_sizes: tuple[int, ...]
    world_size: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.shard_sizes) < self.world_size:
            raise ValueError(
                f"{len(self.shard_sizes)} latent shard(s) for {self.world_size} training workers: every worker "
                "needs at least one shard per epoch. Encode into more shards (lower ingest.samples_per_shard) "
                "or use fewer train.num_workers."
            )
        if self.plan(0).steps == 0:
            raise ValueError(
                f"no rank can fill one batch of {self.batch_size} from its shards "
                f"(shard sizes {list(self.shard_sizes)}, {self.world_size} workers): lower train.batch_size_per_worker"
            )

    def plan(self, epoch: int) -> EpochPlan:
        world, shards = self.world_size, len(self.shard_sizes)
        permutation = np.random.default_rng([self.seed, epoch]).permutation(shards).tolist()
        dealt = shards - shards % world
        by_rank = [permutation[rank:dealt:world] for rank in range(world)]
        samples_per_rank = [sum(self.shard_sizes[shard] for shard in ranked) for ranked in by_rank]
        steps = min(samples_per_rank) // self.batch_size
        used = steps * self.batch_size * world
        return EpochPlan(by_rank, permutation[dealt:], steps, sum(self.shard_sizes) - used)

    def rank_samples(self, epoch: int, rank: int) -> list[tuple[int, int]]:
        """(shard, index) pairs rank `rank` visits in `epoch`, before cutting into batches."""
        samples = []
        for shard in self.plan(epoch).shards_by_rank[rank]:
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(self.shard_sizes[shard])
            samples.extend((shard, int(index)) for index in order)
        return samples

    def batches(self, rank: int, epoch: int = 0, index: int = 0) -> Iterator[BatchPosition]:
        """Endless batches for `rank`, starting at batch `index` of `epoch` (past the end: next epoch)."""
        while True:
            steps = self.plan(epoch).steps
            if steps == 0:
                raise ValueError(f"epoch {epoch}: no rank can fill a batch of {self.batch_size}")
            samples = self.rank_samples(epoch, rank)
            for batch in range(index, steps):
                yield BatchPosition(epoch, batch, samples[batch * self.batch_size : (batch + 1) * self.batch_size])
            epoch, index = epoch + 1, 0
