"""Encode: raw webdataset shards -> latent shards (VAE latents + CLIP text embeddings).

One latent shard per raw shard, same stem (`encode/shards/STEM.tar`), written by one call of an
encoder actor: a pool of actors each holds the VAE and text encoder once (one GPU per actor where
there are GPUs); a call starts a CPU decode task that streams the raw shard's decoded, centre-cropped
images in batches, encodes them and writes the tar, then the shard's one progress record. The driver
keeps at most two shards in flight per actor and reads back one record per shard: O(S) work.
With encode.buckets each image is cropped to the nearest aspect-ratio bucket instead
(`pipeline.core.buckets`) and each batch holds one bucket. Progress is kept per raw shard (see
`ingest.encode.progress`), so an interrupted stage resumes where it stopped. Damaged shards and
undecodable images are counted, never fatal. `encode/manifest.json` records which models made the
latents, counts, sizes, each latent shard's samples, and the empty-caption embedding that training
uses for caption dropout. At a new encode.resolution of the same run (a multi-resolution schedule)
only the VAE runs: the text embeddings come from the previous resolution's latents (`ingest.encode.reuse`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
import time
from typing import Any

import numpy as np
import torch

from ingest.encode import progress, reuse
from ingest.encode.class_labels import find_classes
from ingest.encode.crop import manifest_summary
from ingest.encode.shard_io import PIXELS, RECORD, DecodeOptions, decode_task, write_samples
from pipeline.core import faults, layout
from pipeline.core.arrays import to_base64_npy
from pipeline.core.buckets import bucket_name, check_buckets
from pipeline.core.config import EncodeConfig, PipelineConfig
from pipeline.core.errors import StageFailure
from pipeline.core.identity import configured_names
from pipeline.core.inflight import bounded
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir, complete_shards
from pipeline.core.shard_bar import ShardBar

logger = get_logger("encode")

# Raw shards an encoder actor works on at once: one's decoding and writing overlap the other's forward passes.
SHARDS_PER_ACTOR = 2
# Decoded batches a decode task may stream ahead of its encoder actor (bounds the object store's share).
DECODE_AHEAD = 4


# Pure core ---------------------------------------------------------------------------------
def to_model_input(images: np.ndarray) -> torch.Tensor:
    """BxHxWx3 uint8 -> Bx3xHxW float in [-1, 1], as SD's VAE expects."""
    images = np.require(images, requirements="W")  # Ray Data hands out read-only arrays
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def latent_members(config: EncodeConfig) -> list[str]:
    """The latent members every sample of a latent shard holds under this config."""
    members = [layout.LATENT_KEY] + ([layout.LATENT_STD_KEY] if config.store_distribution else [])
    if config.flip_copies:
        members += [layout.LATENT_FLIP_KEY] + ([layout.LATENT_FLIP_STD_KEY] if config.store_distribution else [])
    return members


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, scaling_factor: float, store_distribution: bool) -> list[np.ndarray]:
    """[mode] or [mean, std] of the VAE posterior, times the scaling factor, as float16 numpy.

    The posterior is diagonal Gaussian, so a latent drawn as mean + std * noise from the scaled
    pair is exactly a scaled draw from the posterior: training can sample afresh every epoch.
    """
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    outputs = [posterior.mean] + ([posterior.std] if store_distribution else [])
    return [(output.float() * scaling_factor).cpu().numpy().astype(np.float16) for output in outputs]


@torch.no_grad()
def encode_batch(
    pixels: torch.Tensor,
    captions: list[str],
    encoders,
    scaling_factor: float,
    config: EncodeConfig,
    reused: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """One batch through the encoders: member name -> float16 array with one row per image.

    `pixels` are Bx3xHxW in [-1, 1]; `encoders` holds vae, tokenizer and text_encoder (see
    `pipeline.core.identity.Encoders`). The members are `latent_members(config)` plus the text embedding.
    `reused` (the batch's columns, `ingest.encode.reuse`) may carry rows' text members from latents of
    another resolution: only the other rows' captions go through the text encoder.
    """
    from pipeline.core.models import encode_prompts

    def encode_text(texts: list[str]) -> dict[str, np.ndarray]:
        text = encode_prompts(encoders.tokenizer, encoders.text_encoder, texts)
        return {layout.TEXT_EMBEDDING_KEY: text.float().cpu().numpy().astype(np.float16)}

    arrays = encode_latents(encoders.vae, pixels, scaling_factor, config.store_distribution)
    if config.flip_copies:
        arrays += encode_latents(encoders.vae, pixels.flip(-1), scaling_factor, config.store_distribution)
    return {**dict(zip(latent_members(config), arrays)), **reuse.complete_text(reused or {}, captions, encode_text)}


class Encoder:
    """Holds the VAE and text encoder once. As a Ray actor, each `encode_shard` call turns one raw shard
    into its one latent shard; two calls run at once, so one shard's decoding and writing overlap the
    other's forward passes, which take turns on the encoders."""

    def __init__(self, settings: dict[str, Any], run_url: str | None = None, options: DecodeOptions | None = None):
        from pipeline.core.identity import Encoders
        from pipeline.core.models import vae_scaling_factor

        self.config = EncodeConfig.model_validate(settings)
        torch.set_num_threads(max(1, int(self.config.cpus_per_actor)))
        self.device = torch.device("cuda" if self.config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.precision)
        self.encoders = Encoders.load(self.config)
        self.encoders.vae.to(self.device)
        self.encoders.text_encoder.to(self.device)
        self.scaling_factor = vae_scaling_factor(self.encoders.vae)
        self.run_url, self.options = run_url, options
        self.turn = threading.Lock()  # one forward pass at a time: the calls share the encoders

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoded batch (one image shape) -> member name -> float16 array with one row per image."""
        faults.inject("encode-batch")
        captions = [str(caption) for caption in batch[layout.CAPTION_KEY]]
        use_autocast = self.autocast is not None and self.device.type == "cuda"
        pixels = to_model_input(batch[PIXELS]).to(self.device)
        reused = {name: np.asarray(batch[name]) for name in (reuse.REUSED, *reuse.TEXT_MEMBERS) if name in batch}
        with self.turn, torch.autocast(self.device.type, dtype=self.autocast, enabled=use_autocast):
            return encode_batch(pixels, captions, self.encoders, self.scaling_factor, self.config, reused=reused)

    def encode_shard(self, name: str) -> dict[str, Any]:
        """Raw shard `name` -> `encode/shards/STEM.tar` (none when no image decoded), then its progress
        record, which is returned. A decode task streams the batches; a retried call writes the same tar."""
        import ray
        from webdataset import TarWriter

        run, shard = RunDir(self.run_url), progress.stem(name)
        decode = ray.remote(decode_task).options(
            num_cpus=self.config.cpus_per_decode_task,
            num_returns="streaming",
            _generator_backpressure_num_objects=DECODE_AHEAD,
            max_retries=3,
        )
        record, written = None, 0
        with contextlib.ExitStack() as output:
            writer = None
            for ref in decode.remote(self.run_url, name, self.options):
                batch = ray.get(ref)
                del ref  # the object store may free the decoded pixels now
                if RECORD in batch:
                    record = batch[RECORD]
                    continue
                arrays = self(batch)
                if writer is None:  # opened at the first batch: a shard with no image gets no tar
                    handle = output.enter_context(run.open_write(progress.latent_tar_path(shard)))
                    writer = TarWriter(handle, encoder=False, mtime=0)
                written += write_samples(writer, batch, arrays, with_labels=self.options.classes is not None)
            if writer is not None:
                writer.close()
        if record is None or written != record["valid"]:
            raise RuntimeError(f"encode: raw shard {name}: decoding stopped early ({written} samples written)")
        if not written:
            run.remove(progress.latent_tar_path(shard))  # a previous resolution's, or an older attempt's
        record["written"] = written
        run.write_json(progress.shard_record_path(shard), record)
        faults.inject("encode-shard")
        return record


# Stage -------------------------------------------------------------------------------------
def bucket_manifest_fields(buckets: list, downsample: int, channels: int) -> dict[str, Any]:
    """The buckets and each one's latent shape; raises naming encode.buckets if the VAE cannot encode one exactly."""
    buckets = [tuple(bucket) for bucket in buckets]
    check_buckets(buckets, downsample, where=f"encode.buckets (this VAE downsamples {downsample}x)")
    return {
        "buckets": [list(bucket) for bucket in buckets],
        "bucket_latent_shapes": {bucket_name(b): [channels, b[1] // downsample, b[0] // downsample] for b in buckets},
    }


def bucket_counts(state: dict[str, progress.ShardProgress], buckets: list) -> dict[str, Any]:
    records = [shard.record for shard in state.values() if shard.complete]
    return manifest_summary(records, [tuple(bucket) for bucket in buckets])


def latent_shards(state: dict[str, progress.ShardProgress], bucketed: bool) -> list[dict[str, Any]]:
    """Per complete raw shard that wrote samples, by stem: its samples (per bucket too with `bucketed`);
    its latent shard is `encode/shards/STEM.tar`. Training plans its data order from these counts
    without reading a tar."""
    entries = []
    for stem in sorted(stem for stem, shard in state.items() if shard.complete and shard.written):
        shard = state[stem]
        entry = {"name": stem, "samples": shard.written}
        if bucketed:
            entry["buckets"] = shard_bucket_counts(shard)
        entries.append(entry)
    return entries


def shard_bucket_counts(shard: progress.ShardProgress) -> dict[str, int]:
    """A complete shard's samples per bucket, from its progress record; raises naming the shard if
    the record has none (written before encode counted buckets) or they miss the samples written."""
    where = progress.shard_record_path(shard.stem)
    counts = shard.record.get("buckets")
    if counts is None:
        raise RuntimeError(
            f"encode: raw shard {shard.stem} has no per-bucket counts in {where} (an older run's record): "
            "remove that file and run the encode stage again to encode the shard anew"
        )
    if sum(counts.values()) != shard.written:
        raise RuntimeError(
            f"encode: raw shard {shard.stem}'s per-bucket counts in {where} add up to {sum(counts.values())} "
            f"samples, but its latent tars hold {shard.written}"
        )
    return dict(sorted(counts.items()))


def build_manifest(config: EncodeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model identity records, the manifest's other fixed fields), computed once on the driver."""
    from pipeline.core.identity import Encoders
    from pipeline.core.models import encode_prompts

    encoders = Encoders.load(config)
    records = encoders.records(config)
    empty = encode_prompts(encoders.tokenizer, encoders.text_encoder, [""])[0].float().numpy().astype(np.float16)
    downsample = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    latent_shape = [
        encoders.vae.config.latent_channels,
        config.resolution // downsample,
        config.resolution // downsample,
    ]
    members = latent_members(config)
    channels = encoders.vae.config.latent_channels
    buckets = bucket_manifest_fields(config.buckets, downsample, channels) if config.buckets else {}
    return records, {
        **buckets,
        "resolution": config.resolution,
        "latent_storage": "distribution" if config.store_distribution else "mode",
        "flip_copies": config.flip_copies,
        "members": members,
        "latent_shape": latent_shape,
        "text_embedding_shape": list(empty.shape),
        "dtype": "float16",
        "bytes_per_sample": 2 * (len(members) * math.prod(latent_shape) + math.prod(empty.shape)),
        "empty_caption_embedding": to_base64_npy(empty),
    }


def run_stage(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    """Encode the raw shards not encoded yet, then write encode/manifest.json; returns the stage's counts."""
    settings = config.encode
    started = time.monotonic()
    raw = complete_shards(run)
    if not raw:
        raise FileNotFoundError(f"no raw shards under {run.path(layout.INGEST_SHARDS)}: run the ingest stage first")
    names = {progress.stem(name): name for name in raw}
    previous = reusable_latents(run, settings)
    image = {"image": {"resolution": settings.resolution}}  # progress of another resolution is never kept
    # The driver loads and hashes the models for the manifest while the first pass runs: on a
    # cluster that is many seconds of CPU work no GPU should wait for. Until the hashes are
    # known, progress is matched by model names; then once more by weights, which drops what
    # other weights under the same names encoded before.
    todo, found, state = progress.prepare(run, list(names), {**configured_names(settings), **image}, reusing=previous is not None)
    logger.info(f"{len(raw)} raw shard(s), {found['kept_shards']} already encoded, {len(todo)} to encode")
    if previous:
        logger.info(f"{settings.resolution} px; the text embeddings come from the {previous['resolution']} px latents")
    classes = stage_classes(settings, run, raw)
    encoded = set(todo)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        manifest_fields = pool.submit(build_manifest, settings)
        if todo:
            state.update(encode_shards(config, run, [names[stem] for stem in todo], previous, classes, done=len(state)))
        records, fixed = manifest_fields.result()
    if previous and not reuse.same_text_encoder(previous, records):
        logger.info("other text encoder weights under the same name: encoding every caption again")
        reuse.forget(run)
        previous = None
        state = {}
    if not progress.confirm_models(run, {**records, **image}, reusing=previous is not None):
        state = {}  # other weights under the same names encoded what was kept: all of it is encoded again
    if len(state) < len(names):
        todo = [stem for stem in names if stem not in state]
        encoded.update(todo)
        state.update(encode_shards(config, run, [names[stem] for stem in todo], previous, classes, done=len(state)))

    counts = progress.totals(state)
    seconds = time.monotonic() - started
    classes_fields = {"class_field": settings.class_field, "classes": classes} if classes is not None else {}
    this_run = {
        "resume": {**found, "encoded_shards": len(encoded)},
        "seconds": round(seconds, 2),
        "samples_per_s": round(sum(state[stem].written for stem in encoded) / max(seconds, 1e-9), 2),
    }
    manifest = encode_manifest({**records, **fixed, **classes_fields}, state, counts, settings, previous, this_run)
    run.write_json(layout.ENCODE_MANIFEST, manifest)
    reuse.finish(run, previous, set(state))  # only now: a crash before this resumes from the record
    if counts["samples"] == 0:
        raise StageFailure("encode wrote no sample: no image of any raw shard decoded")
    return {"counts": stage_counts(counts, found, classes), "outputs": [layout.ENCODE_SHARDS, layout.ENCODE_MANIFEST]}


def reusable_latents(run: RunDir, settings: EncodeConfig) -> dict[str, Any] | None:
    """Latents of another resolution (a multi-resolution schedule) whose text embeddings are reused,
    or None (none, or another text encoder made them: then they are forgotten)."""
    previous = reuse.stash(run, settings.resolution)
    if previous and not reuse.same_text_encoder(previous, configured_names(settings)):
        reuse.forget(run, previous)
        previous = None
    return previous


def encode_manifest(
    fixed: dict[str, Any],
    state: dict[str, progress.ShardProgress],
    counts: dict[str, Any],
    settings: EncodeConfig,
    previous: dict[str, Any] | None,
    this_run: dict[str, Any],
) -> dict[str, Any]:
    """encode/manifest.json: `fixed` (model identity, shapes, classes), the counts over complete
    shards, per-bucket counts, each raw shard's samples (`latent_shards`), where the text
    embeddings came from, then `this_run` (resume, speed)."""
    reused = progress.text_reused(state)
    manifest = {
        **fixed,
        **counts,
        **(bucket_counts(state, settings.buckets) if settings.buckets else {}),
        # Per raw shard: its samples (and per bucket), for planning without reading data.
        "latent_shards": latent_shards(state, bucketed=bool(settings.buckets)),
        # Captions whose embeddings came from the previous resolution's latents, not the text encoder.
        "text_embeddings": {
            "reused": reused,
            "encoded": counts["samples"] - reused,
            "reused_from_resolution": previous["resolution"] if previous else None,
        },
        **this_run,
    }
    if previous:  # the same tensor the reused embeddings' caption dropout trained on so far
        manifest["empty_caption_embedding"] = previous["empty_caption_embedding"]
    return manifest


def stage_counts(counts: dict[str, Any], found: dict[str, Any], classes: list[str] | None) -> dict[str, int]:
    """The stage's summary counts (`progress.totals`'s, with `found`'s resumed shards)."""
    return {
        "samples": counts["samples"],
        "skipped": counts["skipped_undecodable"],
        **({"unlabelled": counts["skipped_unlabelled"]} if classes is not None else {}),
        "shards": counts["latent_shard_count"],
        "truncated_shards": len(counts["truncated_shards"]),
        "unreadable_shards": len(counts["unreadable_shards"]),
        "resumed_shards": found["kept_shards"],
    }


def stage_classes(settings: EncodeConfig, run: RunDir, raw_shards: list[str]) -> list[str] | None:
    """The class names in label order (see `ingest.encode.class_labels`); None without encode.class_field."""
    if not settings.class_field:
        return None
    if settings.classes is not None:
        return list(settings.classes)
    classes = find_classes(run, raw_shards, settings.class_field)
    if not classes:
        raise ValueError(f"encode.class_field = {settings.class_field!r}: no sample of the raw shards has that metadata field")
    logger.info(f"{len(classes)} classes of {settings.class_field!r}: {classes[:20]}")
    return classes


def encode_shards(
    config: PipelineConfig,
    run: RunDir,
    shards: list[str],
    previous: dict[str, Any] | None = None,
    classes: list[str] | None = None,
    done: int = 0,
) -> dict[str, progress.ShardProgress]:
    """Encode raw shards `shards` (tar names): one `Encoder.encode_shard` call per shard on a pool of
    encoder actors, at most SHARDS_PER_ACTOR in flight on each, so the driver's work is O(shards).
    Returns their progress (the records the calls wrote), by stem.

    With `previous` (`ingest.encode.reuse.stash`) the decode tasks attach each sample's earlier text members."""
    import ray

    settings = config.encode
    options = DecodeOptions(
        resolution=settings.resolution,
        batch_size=settings.batch_size,
        max_pixels=int(config.ingest.max_megapixels * 1e6),
        buckets=[tuple(bucket) for bucket in settings.buckets] if settings.buckets else None,
        previous={"text_embedding_shape": previous["text_embedding_shape"]} if previous else None,
        class_field=settings.class_field,
        classes=classes,
    )
    actor = ray.remote(Encoder).options(
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
        max_concurrency=SHARDS_PER_ACTOR,
        max_restarts=4,  # a dead actor is replaced, and its calls run again: each rewrites its one tar
        max_task_retries=3,
    )
    actors = [actor.remote(settings.model_dump(), run.url, options) for _ in range(min(settings.num_actors, len(shards)))]
    load = [0] * len(actors)
    owner: dict[str, int] = {}

    def submit(name: str):
        index = min(range(len(actors)), key=load.__getitem__)  # the least busy actor
        load[index] += 1
        owner[name] = index
        return actors[index].encode_shard.remote(name)

    state = {}
    try:
        with ShardBar(logger, "encode", total=done + len(shards), done=done) as bar:
            for name, record in bounded(submit, shards, limit=SHARDS_PER_ACTOR * len(actors)):
                load[owner.pop(name)] -= 1
                state[record["shard"]] = progress.ShardProgress(record["shard"], record)
                skipped = {"undecodable": record["undecodable"], "unlabelled": record.get("unlabelled", 0)}
                skipped.update({"truncated_shard": int(record["truncated"]), "unreadable_shard": int(record["unreadable"])})
                bar.update(record["written"], skipped)
    finally:
        for each in actors:
            ray.kill(each)
    return state
