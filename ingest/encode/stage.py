"""Encode: raw webdataset shards -> latent shards (VAE latents + CLIP text embeddings).

A Ray Data pipeline: one CPU task per raw shard streams it, decodes and centre-crops the
images in batches; an actor pool whose actors each hold the VAE and text encoder once encodes
the batches (one GPU per actor where there are GPUs); write tasks publish latent tars.
With encode.buckets each image is cropped to the nearest aspect-ratio bucket instead
(`pipeline.core.buckets`), decode batches hold one bucket each, and the actors encode whatever
shapes a batch joins separately. Progress is kept per raw shard (see `ingest.encode.progress`), so an interrupted stage
resumes where it stopped. Damaged shards and undecodable images are counted, never fatal.
`encode/manifest.json` records which models made the latents, counts, sizes, and the
empty-caption embedding that training uses for caption dropout. At a new encode.resolution of
the same run (a multi-resolution schedule) only the VAE runs: the text embeddings come from the
previous resolution's latents (`ingest.encode.reuse`).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from typing import Any

import numpy as np
import torch

from ingest.encode import progress, reuse
from ingest.encode.class_labels import find_classes
from ingest.encode.crop import manifest_summary
from ingest.encode.shard_io import KEY, PIXELS, SHARD, DecodeOptions, decode_shards, latent_sink
from pipeline.core import faults, layout
from pipeline.core.arrays import to_base64_npy
from pipeline.core.buckets import bucket_name, check_buckets
from pipeline.core.config import EncodeConfig, PipelineConfig
from pipeline.core.identity import configured_names
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir, complete_shards

logger = get_logger("encode")

# Write tasks serialise arrays and upload: mostly waiting on storage, so a quarter of a core.
WRITE_TASK_CPUS = 0.25


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
    """An actor holding the VAE and text encoder once; one call encodes one batch."""

    def __init__(self, settings: dict[str, Any]):
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        faults.inject("encode-batch")
        captions = [str(caption) for caption in batch[layout.CAPTION_KEY]]
        use_autocast = self.autocast is not None and self.device.type == "cuda"
        # Ray Data may join decode batches of different buckets into one: encode each shape on its own.
        groups = rows_by_shape(batch[PIXELS])
        encoded = []
        for rows in groups:
            pixels = batch[PIXELS] if batch[PIXELS].dtype != object else np.stack([batch[PIXELS][row] for row in rows])
            pixels, texts = to_model_input(pixels).to(self.device), [captions[row] for row in rows]
            reused = {name: np.asarray(batch[name])[rows] for name in (reuse.REUSED, *reuse.TEXT_MEMBERS) if name in batch}
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=use_autocast):
                encoded.append(encode_batch(pixels, texts, self.encoders, self.scaling_factor, self.config, reused=reused))
        arrays = encoded[0] if len(groups) == 1 else join_rows(groups, encoded)
        passed = {name: batch[name] for name in (KEY, SHARD, layout.META_KEY, layout.CLASS_KEY)}
        return {**passed, **arrays}


def rows_by_shape(pixels: np.ndarray) -> list[list[int]]:
    """Row indices grouped by image shape, in order of first appearance. A batch of one shape is one
    4-d array; one of several shapes arrives as an object array of HxWx3 arrays."""
    if pixels.dtype != object:
        return [list(range(len(pixels)))]
    groups: dict[tuple, list[int]] = {}
    for row, image in enumerate(pixels):
        groups.setdefault(np.shape(image), []).append(row)
    return list(groups.values())


def join_rows(groups: list[list[int]], encoded: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-group outputs back in the batch's row order; members whose shapes differ become object arrays."""
    count = sum(len(rows) for rows in groups)
    joined = {}
    for member in encoded[0]:
        column = np.empty(count, dtype=object)
        for rows, arrays in zip(groups, encoded):
            for row, array in zip(rows, arrays[member]):
                column[row] = array
        same = len({array.shape for array in column}) == 1
        joined[member] = np.stack(list(column)) if same else column
    return joined


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
    """Per complete raw shard, by stem: its latent tars and samples (per bucket too with `bucketed`),
    so that training can plan its data order from the manifest without reading a tar."""
    entries = []
    for stem in sorted(stem for stem, shard in state.items() if shard.complete):
        shard = state[stem]
        entry = {"name": stem, "parts": sorted(f"{part['part']}.tar" for part in shard.parts), "samples": shard.written}
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
    members = latent_members(settings)
    previous = reusable_latents(run, settings)
    image = {"image": {"resolution": settings.resolution}}  # progress of another resolution is never kept
    # The driver loads and hashes the models for the manifest while the first pass runs: on a
    # cluster that is many seconds of CPU work no GPU should wait for. Until the hashes are
    # known, progress is matched by model names; then once more by weights, which drops what
    # other weights under the same names encoded before.
    todo, found = progress.prepare(run, list(names), {**configured_names(settings), **image}, reuse.tar_names(previous))
    logger.info(f"{len(raw)} raw shard(s), {found['kept_shards']} already encoded, {len(todo)} to encode")
    if previous:
        logger.info(f"{settings.resolution} px; the text embeddings come from the {previous['resolution']} px latents")
    classes = stage_classes(settings, run, raw)
    encoded = set(todo)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        manifest_fields = pool.submit(build_manifest, settings)
        if todo:
            encode_shards(config, run, [names[stem] for stem in todo], members, previous, classes)
        records, fixed = manifest_fields.result()
    if previous and not reuse.same_text_encoder(previous, records):
        logger.info("other text encoder weights under the same name: encoding every caption again")
        reuse.forget(run, previous)
        previous = None
    # A task Ray retried after its worker died yields its rows twice: that shard's parts then
    # add up to more than it holds, so it is discarded and encoded again here.
    for attempt in range(3):
        todo, _ = progress.prepare(run, list(names), {**records, **image}, reuse.tar_names(previous))
        if not todo or attempt == 2:
            break
        encoded.update(todo)
        encode_shards(config, run, [names[stem] for stem in todo], members, previous, classes)
    if todo:
        raise RuntimeError(f"encode did not finish raw shard(s) {todo[:10]}; run the stage again to resume them")

    state = progress.read_progress(run)
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
    reuse.finish(run, previous)  # only now: a crash before this resumes from the previous tars
    if counts["samples"] == 0:
        raise RuntimeError("encode wrote no sample: no image of any raw shard decoded")
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
    shards, per-bucket counts, each raw shard's parts and samples (`latent_shards`), where the text
    embeddings came from, then `this_run` (resume, speed)."""
    reused = progress.text_reused(state)
    manifest = {
        **fixed,
        **counts,
        **(bucket_counts(state, settings.buckets) if settings.buckets else {}),
        # Per raw shard: its parts and samples (and per bucket), for planning without reading data.
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
        "shards": len(counts["shards"]),
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
    members: list[str],
    previous: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> None:
    """The Ray Data pipeline over `shards` (raw tar names): decode tasks -> encoder actors -> sink.

    With `previous` (`ingest.encode.reuse.stash`) the decode tasks attach each sample's earlier text members."""
    import ray

    settings = config.encode
    options = DecodeOptions(
        resolution=settings.resolution,
        batch_size=settings.batch_size,
        max_pixels=int(config.ingest.max_megapixels * 1e6),
        buckets=[tuple(bucket) for bucket in settings.buckets] if settings.buckets else None,
        previous={key: previous[key] for key in ("parts", "text_embedding_shape")} if previous else None,
        class_field=settings.class_field,
        classes=classes,
    )
    dataset = (
        ray.data.from_items([{SHARD: name} for name in shards], override_num_blocks=len(shards))
        .map_batches(
            decode_shards,
            fn_kwargs={"run_url": run.url, "options": options},
            batch_size=1,
            num_cpus=settings.cpus_per_decode_task,
        )
        .map_batches(
            Encoder,
            fn_constructor_kwargs={"settings": settings.model_dump()},
            compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
            batch_size=settings.batch_size,
            num_cpus=settings.cpus_per_actor,
            num_gpus=settings.gpus_per_actor,
        )
    )
    sink = latent_sink(run.url, members, config.ingest.samples_per_shard, with_labels=classes is not None)
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
