"""`pipeline bench readers`: our latent shard reader against webdataset's wids and mosaicml-streaming.

All three read the same synthetic latent shards on local disk (`write_synthetic_latents`: the
tiny preset's shapes, latents fp16 [4, 8, 8] and text embeddings fp16 [77, 64], in shards of 500)
and collate batches of 32 fp16 tensors in the training process; no model runs. The readers:

- `ours`: `train.order.DataOrder` (one stream, shuffle windows of 4 shards) and
  `train.stream.ShardStream` (whole shards read a window ahead on 2 threads), batches by `assemble`;
- `wids`: `wids.ShardListDataset` over the same tars, from a descriptor JSON written from the
  manifest's counts, in the order of `wids.ChunkedSampler` (what `DistributedChunkedSampler`
  returns on one rank) with chunks of 4 shards' samples;
- `mosaic`: `streaming.StreamingDataset` (mosaicml-streaming) over a copy of the shards converted to
  its MDS format (the conversion is timed and sized: what the library costs the shard format), local
  only, shuffle_algo py1e with shuffle blocks of 4 shards' samples.

The shuffle range is the same 2,000 samples for all three, so that none wins by reading fewer
shards at a time. Each reader runs in its own fresh process, twice: a whole epoch from the start
(time to the first batch, steady samples/s after it, peak RSS) and a resume at the middle of the
epoch (time to the first batch there; `resume_exact` says whether it is the batch the
uninterrupted epoch had at that position). The data are written just before, so every reader
finds them in the page cache.

mosaicml-streaming is not a dependency: its last release pins transformers<5 and requires
torchvision, which this stack cannot take (see docs/training.md). Where `import streaming` fails,
the JSON says so under `mosaic.error` and the other two are still measured. `import streaming`
imports its vision datasets and with them torchvision: the bench's process stands an empty module
in for `streaming.vision`, which it never uses.

    pipeline bench readers --images 20000
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_IMAGES = 20_000
BATCH_SIZE = 32
WINDOW_SHARDS = 4
READERS = ("ours", "wids", "mosaic")
CHILD_TIMEOUT_S = 600
# Epochs and resumes per reader, each in a fresh process; the best time of each is reported.
ROUNDS = 2
# Entries of a reader's result that ratios are taken of (reader over ours).
RATIO_KEYS = ("samples_per_s", "first_batch_s", "resume_first_batch_s", "import_s", "peak_rss_mb", "reader_rss_mb")


def run_bench(images: int = DEFAULT_IMAGES, cpus: int = 2) -> dict[str, Any]:
    """Every reader over the same `images` synthetic latents; `cpus` is unused (no Ray here)."""
    from pipeline.bench.common import Stopwatch, logger
    from pipeline.bench.train import write_synthetic_latents
    from pipeline.core import layout
    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir

    log = logger("readers")
    if images < 4 * BATCH_SIZE:
        raise ValueError(f"--images {images}: the bench needs at least 4 batches of {BATCH_SIZE}")
    config = load_config("tiny")
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as scratch:
        run = RunDir(Path(scratch) / "run")
        with Stopwatch() as watch:
            shards = write_synthetic_latents(config, run, images)
        manifest = run.read_json(layout.ENCODE_MANIFEST)
        shard_dir = Path(run.path(layout.ENCODE_SHARDS))
        log(f"{images} synthetic latents in {shards} shards ({_mb(_bytes_under(shard_dir))} MB) in {watch.seconds:.1f} s")
        wids_path = Path(scratch) / "wids.json"
        wids_path.write_text(json.dumps(wids_descriptor(manifest, shard_dir)))
        per_shard = images // shards
        job = {
            "run": str(run.root),
            "wids": str(wids_path),
            "mds": str(Path(scratch) / "mds"),
            "seed": config.seed,
            "batch": BATCH_SIZE,
            "window": WINDOW_SHARDS,
            "shuffle_samples": WINDOW_SHARDS * per_shard,
            "steps": images // BATCH_SIZE,
            "resume_step": images // BATCH_SIZE // 2,
        }
        log("mosaicml-streaming: converting the shards to MDS")
        conversion = run_child("convert", "mosaic", job)
        readers = [reader for reader in READERS if reader != "mosaic" or "error" not in conversion]
        runs: dict[str, list[tuple[dict, dict]]] = {reader: [] for reader in readers}
        for round_ in range(ROUNDS):  # the readers take turns, so that a shared machine's drift falls on all of them
            for reader in readers:
                log(f"{reader} (round {round_ + 1} of {ROUNDS}): an epoch from the start, a resume at step {job['resume_step']}")
                runs[reader].append((run_child("epoch", reader, job), run_child("resume", reader, job)))
        results = {reader: reader_result(reader_runs) for reader, reader_runs in runs.items()}
        if "error" in conversion:
            results["mosaic"] = {"error": conversion["error"]}
        tar_bytes = _bytes_under(shard_dir)
    if "error" not in conversion:
        results["mosaic"]["conversion"] = {**conversion, "size_ratio": round(conversion["mds_bytes"] / tar_bytes, 3)}
    return {
        "bench": "readers",
        "samples": images,
        "shards": shards,
        "batch_size": BATCH_SIZE,
        "shuffle_samples": job["shuffle_samples"],
        "latent_shape": manifest["latent_shape"],
        "text_embedding_shape": manifest["text_embedding_shape"],
        "tar_bytes": tar_bytes,
        "versions": _versions(),
        "readers": results,
        "ratios": ratios(results),
        "device": "cpu",
    }


def wids_descriptor(manifest: dict, shard_dir: Path) -> dict[str, Any]:
    """The dataset description `wids.ShardListDataset` reads: every tar and its sample count (one
    latent tar per raw shard, `STEM.tar`, counted in the manifest's `latent_shards`)."""
    shardlist = [
        {"url": str(shard_dir / f"{entry['name']}.tar"), "nsamples": int(entry["samples"])} for entry in manifest["latent_shards"]
    ]
    return {"wids_version": 1, "name": "latents", "shardlist": shardlist}


def reader_result(runs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """One reader's entry from its (epoch, resume) runs: the best time and the highest memory of
    each; an error in any run is the entry."""
    for run in (run for pair in runs for run in pair):
        if "error" in run:
            return {"error": run["error"]}
    epochs, resumes = [epoch for epoch, _ in runs], [resume for _, resume in runs]
    best = max(epochs, key=lambda epoch: epoch["samples_per_s"])
    return {
        **{key: value for key, value in best.items() if key != "resume_keys"},
        "samples_per_s_runs": [epoch["samples_per_s"] for epoch in epochs],
        "first_batch_s": min(epoch["first_batch_s"] for epoch in epochs),
        "import_s": min(epoch["import_s"] for epoch in epochs),
        "peak_rss_mb": max(epoch["peak_rss_mb"] for epoch in epochs),
        "reader_rss_mb": max(epoch["reader_rss_mb"] for epoch in epochs),
        "resume_first_batch_s": min(resume["first_batch_s"] for resume in resumes),
        "resume_peak_rss_mb": max(resume["peak_rss_mb"] for resume in resumes),
        "resume_exact": all(resume["resume_keys"] == epoch["resume_keys"] for epoch, resume in runs),
    }


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each other reader's numbers over ours (above 1: more samples/s, or more seconds or memory)."""
    ours = results["ours"]
    return {
        reader: {key: round(result[key] / ours[key], 3) if ours[key] else None for key in RATIO_KEYS}
        for reader, result in results.items()
        if reader != "ours" and "error" not in result
    }


def run_child(phase: str, reader: str, job: dict) -> dict[str, Any]:
    """`phase` of `reader` in a fresh Python process: its last stdout line, or {"error": ...}; ours must work."""
    command = [sys.executable, "-m", "pipeline.bench.readers", json.dumps({**job, "phase": phase, "reader": reader})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    if reader == "ours":
        raise RuntimeError(f"bench readers: {phase} of our reader failed: {result.stderr[-3000:]}")
    return {"error": error}


# -- in the child process -------------------------------------------------------------------------


def child_main(job: dict) -> dict[str, Any]:
    """One phase of one reader: "convert" (mosaic only), "epoch" or "resume"."""
    import torch  # every reader's batches are torch tensors: loaded before the clock and the memory baseline

    if job["phase"] == "convert":
        return {**convert_to_mds(job), "peak_rss_mb": _peak_rss_mb()}
    before_mb, started = _rss_mb(), time.perf_counter()
    _import_reader(job["reader"])
    import_s, baseline_mb = time.perf_counter() - started, _rss_mb()
    started = time.perf_counter()
    batches = {"ours": ours_batches, "wids": wids_batches, "mosaic": mosaic_batches}[job["reader"]]
    offset = job["resume_step"] * job["batch"] if job["phase"] == "resume" else 0
    steps = 1 if job["phase"] == "resume" else job["steps"] - (offset // job["batch"])
    times, seen, resume_keys = [], set(), None
    for step, (batch, keys) in enumerate(batches(job, offset, steps)):
        times.append(time.perf_counter())
        seen.update(keys)
        if step + offset // job["batch"] == job["resume_step"]:
            resume_keys = keys
        assert batch["latents"].dtype == torch.float16 and len(batch["latents"]) == job["batch"]
    first, rest = times[0] - started, times[-1] - times[0]
    peak_mb = _peak_rss_mb()
    return {
        "first_batch_s": round(first, 4),
        # The whole epoch's rate, first batch included: ours reads a whole window before its first batch.
        "samples_per_s": round(len(times) * job["batch"] / (times[-1] - started), 1),
        "after_first_batch_samples_per_s": round((len(times) - 1) * job["batch"] / rest, 1) if rest > 0 else None,
        "epoch_s": round(times[-1] - started, 3),
        "batches": len(times),
        "distinct_samples": len(seen),
        "import_s": round(import_s, 3),
        "import_rss_mb": round(baseline_mb - before_mb, 1),
        "peak_rss_mb": peak_mb,
        "reader_rss_mb": round(peak_mb - baseline_mb, 1),
        "resume_keys": resume_keys,
    }


def _import_reader(reader: str) -> None:
    """The reader's modules, imported before its clock starts (their time and memory are reported apart)."""
    if reader == "mosaic":
        _streaming()
    else:
        import importlib

        for module in {"ours": ["train.stream"], "wids": ["wids"]}[reader]:
            importlib.import_module(module)


def ours_batches(job: dict, offset: int, steps: int):
    """DataOrder + ShardStream at (epoch 0, `offset` samples taken), as a training rank reads them."""
    from pipeline.core.rundir import RunDir
    from train.data import read_spec
    from train.order import DataOrder
    from train.stream import ShardStream

    run = RunDir(job["run"])
    spec = read_spec(run)
    order = DataOrder(spec.shard_counts, streams=1, window=job["window"], seed=job["seed"])
    stream = ShardStream(run, spec)
    positions = order.batches(0, 1, job["batch"], epoch=0, taken=offset)
    try:
        for _ in range(steps):
            position = next(positions)
            batch = stream.batch(position)
            yield batch, [_our_key(stream, shard, index) for shard, index in position.samples]
    finally:
        stream.close()


def _our_key(stream, shard: int, index: int) -> str:
    part, row = stream.shard(shard).locate(index)
    return part.keys[row]


def wids_batches(job: dict, offset: int, steps: int):
    """wids' indexed dataset over the tars as they are, in ChunkedSampler's order; a resume skips
    `offset` of the sampler's indices (wids keeps no position of its own)."""
    import itertools

    import wids

    from pipeline.core import layout
    from pipeline.core.arrays import from_npy_bytes

    def decode(sample: dict) -> dict:
        return {
            "key": sample["__key__"],
            "latent": from_npy_bytes(sample["." + layout.LATENT_KEY].read()),  # wids hands each member as a BytesIO
            "text": from_npy_bytes(sample["." + layout.TEXT_EMBEDDING_KEY].read()),
        }

    # cache_dir: the shards' own folder, where wids finds them instead of copying each one to /tmp/_wids_cache.
    shard_dir = str(Path(json.loads(Path(job["wids"]).read_text())["shardlist"][0]["url"]).parent)
    dataset = wids.ShardListDataset(job["wids"], cache_dir=shard_dir, transformations=[decode])
    sampler = wids.ChunkedSampler(dataset, chunksize=job["shuffle_samples"], seed=job["seed"], shufflefirst=True)
    indices = itertools.islice(iter(sampler), offset, None)
    for _ in range(steps):
        samples = [dataset[index] for index in itertools.islice(indices, job["batch"])]
        yield _collate(samples), [sample["key"] for sample in samples]


def mosaic_batches(job: dict, offset: int, steps: int):
    """StreamingDataset over the MDS copy (local only, py1e); a resume loads the state dict that
    `state_dict` gives after `offset` samples of epoch 0 on one node."""
    dataset = _streaming().StreamingDataset(
        local=job["mds"],
        batch_size=job["batch"],
        shuffle=True,
        shuffle_algo="py1e",
        shuffle_seed=job["seed"],
        shuffle_block_size=job["shuffle_samples"],
        num_canonical_nodes=1,
    )
    if offset:
        state = {"epoch": 0, "sample_in_epoch": offset, "num_canonical_nodes": 1, "shuffle_seed": job["seed"]}
        dataset.load_state_dict({**state, "initial_physical_nodes": 1})
    samples = iter(dataset)
    for _ in range(steps):
        batch = [next(samples) for _ in range(job["batch"])]
        yield _collate([{"key": s["key"], "latent": s["latent"], "text": s["text"]} for s in batch]), [s["key"] for s in batch]


def convert_to_mds(job: dict) -> dict[str, Any]:
    """The latent tars rewritten as MDS shards of about the tars' size: seconds, bytes, shards."""
    streaming = _streaming()
    from pipeline.core import layout
    from pipeline.core.rundir import RunDir
    from train.data import read_shard, read_spec

    run = RunDir(job["run"])
    spec = read_spec(run)
    size_limit = max(
        Path(run.path(f"{layout.ENCODE_SHARDS}/{part}")).stat().st_size for entry in spec.shards for part in entry.parts
    )
    columns = {
        "key": "str",
        "latent": "ndarray:float16:" + ",".join(map(str, spec.latent_shape)),
        "text": "ndarray:float16:" + ",".join(map(str, spec.text_embedding_shape)),
    }
    started = time.perf_counter()
    with streaming.MDSWriter(out=job["mds"], columns=columns, size_limit=size_limit) as writer:
        for entry in spec.shards:
            part = read_shard(run, spec, entry).by_bucket[""]
            for row, key in enumerate(part.keys):
                writer.write({"key": key, "latent": part.latents[layout.LATENT_KEY][row], "text": part.text_embeddings[row]})
    seconds = time.perf_counter() - started
    files = list(Path(job["mds"]).glob("*.mds"))
    return {"convert_s": round(seconds, 2), "mds_bytes": _bytes_under(Path(job["mds"])), "mds_shards": len(files)}


def _streaming():
    """mosaicml-streaming, without importing its vision datasets (they need torchvision, which is not installed)."""
    import types

    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def _versions() -> dict[str, str | None]:
    """The installed versions of the libraries measured (None: not installed)."""
    from importlib import metadata

    versions = {}
    for package in ("webdataset", "mosaicml-streaming"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _collate(samples: list[dict]) -> dict:
    import torch

    return {
        "latents": torch.from_numpy(np.stack([sample["latent"] for sample in samples])),
        "text_embeddings": torch.from_numpy(np.stack([sample["text"] for sample in samples])),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would keep the parent's
    peak across fork and exec)."""
    return _proc_status_mb("VmHWM")


def _rss_mb() -> float:
    """This process's resident memory now (the peak so far may be a transient of an import)."""
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    raise KeyError(field)


def _bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # collation on one thread, as a training worker of the tiny preset
    print(json.dumps(child_main(json.loads(sys.argv[1]))))
