"""`pipeline bench gpu`: the train stage's UNet step and the encode stage's VAE on one device.

UNet. The `sd15-256` preset's train section as one worker trains it (the SD-1.5 UNet, bf16,
DeepSpeed ZeRO-2, AdamW, the EMA the preset keeps), on one GPU in a single-rank process group,
fed by `train.stream.ShardStream` from synthetic latent shards of 4x32x32 latents and 77x768
text embeddings (256 px images encoded by SD's VAE, captions by CLIP ViT-L/14), written as the
encode stage writes them. After `warmup_steps` untimed steps, `steps` timed ones:
- `images_per_s`: images trained over the timed steps' wall clock (reading, the step, the EMA);
- `flops_per_image`: the UNet's forward and backward on one batch, counted by
  `torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes only, so any size counts
  on any machine; the count is the model's matrix products and convolutions, attention included,
  not what a kernel recomputes; CPU's fused attention is not in the counter's table, the meta
  device's decomposed one is);
- `mfu`: images_per_s x flops_per_image over the device's dense bf16 peak (`BF16_PEAK_TFLOPS` by
  device name; any other device: a measured bf16 matrix product, and `peak_source` says so);
- `peak_memory_gb`: on a GPU torch's peak allocated memory (GiB), on a CPU the process's peak RSS.
  The batch starts at 64 and is halved while it runs out of GPU memory (`batches_out_of_memory`).

VAE. The encode stage's VAE path (`to_model_input`, `encode_latents` under bf16 autocast on a
GPU, fp32 on a CPU, as the encode actor does) on random 256 px images in batches of 128 (the
preset's encode.batch_size): images/s, MFU (its encoder's forward, counted the same way) and
peak memory. SD-1.5's VAE cannot be downloaded here, so it is that architecture (`SD_VAE_CONFIG`),
randomly initialised: the same FLOPs and memory.

The anchor: MosaicML's 137 images/s per A100 training Stable Diffusion at 256 px. `ratio_to_anchor`
is images_per_s over that (across devices: compare MFU), and `anchor_mfu_a100` the MFU that rate
would be with this UNet's FLOPs on an A100 (312 TFLOP/s).

Each part runs in a fresh Python process (`worker_main`): its own process group and a clean
peak-memory reading. `--tiny` runs the tiny preset's UNet on 8x8 latents and its VAE at 64 px
for a few steps, on the CPU where there is no GPU: what the tests run.

    pipeline bench gpu          # a GPU, under 8 minutes
    pipeline bench gpu --tiny   # the tiny shapes, ~1 minute on a CPU
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.bench.common import Stopwatch, free_port, logger, ratio
from pipeline.core.config import PipelineConfig, load_config
from pipeline.core.rundir import RunDir

ANCHOR_IMAGES_PER_S_A100 = 137
A100_BF16_PEAK_TFLOPS = 312

# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),
    ("H200", 989),
    ("A100", 312),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
    ("A10G", 125),
)

# Stable Diffusion 1.5's VAE (its vae/config.json), for a randomly initialised copy.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD_VAE = "sd15-random"

# The smallest batch tried after running out of GPU memory.
MIN_BATCH = 8

log = logger("gpu")


@dataclass(frozen=True)
class BenchShape:
    """What one mode of the bench trains and encodes."""

    preset: str
    """Config preset whose train section (UNet, threads, EMA) and encode batch size the bench uses."""
    resolution: int
    """Image side in px; the latents are an eighth of it a side."""
    text_width: int
    """Width of the synthetic text embeddings, the UNet's cross_attention_dim (CLIP ViT-L/14: 768)."""
    batch: int
    """UNet micro-batch on the one device; halved while it runs out of GPU memory."""
    warmup_steps: int
    """Untimed UNet steps first (allocation, kernel selection, the stream's first window)."""
    steps: int
    """Timed UNet steps."""
    vae: str
    """SD_VAE (SD-1.5's architecture, random weights) or a model name `load_vae` takes."""
    vae_batch: int
    """Images per VAE batch."""
    vae_warmup_batches: int
    """Untimed VAE batches first."""
    vae_batches: int
    """Timed VAE batches."""


FULL = BenchShape("sd15-256", 256, 768, 64, 10, 50, SD_VAE, 128, 3, 20)
TINY = BenchShape("tiny", 64, 64, 8, 2, 5, "builtin:tiny-vae", 16, 1, 3)


def run_bench(cpus: int = 2, tiny: bool = False) -> dict[str, Any]:
    """`tiny`: the TINY shapes (on a GPU if there is one); else FULL, which needs a GPU. `cpus` is
    taken for the CLI's uniform call only."""
    import torch

    shape = TINY if tiny else FULL
    if not tiny and not torch.cuda.is_available():
        raise ValueError("pipeline bench gpu needs a CUDA GPU; --tiny runs the tiny shapes on the CPU")
    with Stopwatch() as total, tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        run = RunDir(Path(scratch) / "run")
        with Stopwatch() as writing:
            shards = _write_latents(run, shape, Path(scratch))
        log(f"{shape.warmup_steps + shape.steps} batches of synthetic latents in {shards} shards: {writing.seconds:.1f} s")
        unet = _train_unet(run, shape)
        vae = run_worker({"part": "vae", "shape": asdict(shape)})
    peak = unet.pop("peak")
    unet["flops_per_image"] = unet_flops_per_image(shape, unet["batch"])
    unet["mfu"] = round(unet["images_per_s"] * unet["flops_per_image"] / peak["flops"], 4)
    vae["flops_per_image"] = vae_flops_per_image(shape)
    vae["mfu"] = round(vae["images_per_s"] * vae["flops_per_image"] / peak["flops"], 4)
    return {
        "bench": "gpu",
        "device": peak["device"],
        "mode": "tiny" if tiny else "full",
        "unet": unet,
        "vae": vae,
        "peak_tflops_bf16": round(peak["flops"] / 1e12, 3),
        "peak_source": peak["source"],
        "anchor_images_per_s_a100": ANCHOR_IMAGES_PER_S_A100,
        "ratio_to_anchor": ratio(unet["images_per_s"], ANCHOR_IMAGES_PER_S_A100),
        "anchor_mfu_a100": round(ANCHOR_IMAGES_PER_S_A100 * unet["flops_per_image"] / (A100_BF16_PEAK_TFLOPS * 1e12), 4),
        "synthetic_shards": shards,
        "write_seconds": round(writing.seconds, 2),
        "seconds": round(total.seconds, 2),
    }


def _write_latents(run: RunDir, shape: BenchShape, scratch: Path) -> int:
    """Latent shards for the warm-up and timed steps at the first batch, `shape.resolution` / 8 a
    side, with the tiny preset's encoders (only the shapes matter here) or, for text embeddings of
    another width, a random text encoder that wide (saved in `scratch`)."""
    from pipeline.bench.train import write_synthetic_latents
    from train.data import read_spec

    side = shape.resolution
    overrides = [f"ingest.image_size={side}", f"ingest.toy_image_size={side}", f"encode.resolution={side}"]
    if shape.text_width != TINY.text_width:
        text_encoder = random_text_encoder(scratch / f"text-encoder-{shape.text_width}", shape.text_width)
        overrides.append(f"encode.text_encoder={text_encoder}")
    config = load_config("tiny", overrides=overrides)
    shards = write_synthetic_latents(config, run, (shape.warmup_steps + shape.steps) * shape.batch)
    spec = read_spec(run)
    if spec.cross_attention_dim != shape.text_width:
        raise RuntimeError(f"the synthetic text embeddings are {spec.cross_attention_dim} wide, not {shape.text_width}")
    return shards


def random_text_encoder(folder: Path, width: int) -> str:
    """A randomly initialised one-layer CLIP text encoder `width` wide (a multiple of 64), saved in
    `folder` as `from_pretrained` reads it; the tiny one's vocabulary and 77 positions. Returns the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.core.models import resolve_model_path

    config = CLIPTextConfig.from_pretrained(resolve_model_path("builtin:tiny-text-encoder"))
    config.update({"hidden_size": width, "intermediate_size": width, "projection_dim": width})
    config.update({"num_attention_heads": width // 64, "num_hidden_layers": 1})
    CLIPTextModel(config).save_pretrained(folder)
    return str(folder)


def _train_unet(run: RunDir, shape: BenchShape) -> dict[str, Any]:
    """The UNet worker's report, at the largest batch from `shape.batch` down (halving) that fits."""
    batch, out_of_memory = shape.batch, []
    while True:
        report = run_worker({"part": "unet", "shape": asdict(shape), "run_url": run.url, "batch": batch}, distributed=True)
        if not report.get("out_of_memory"):
            return {**report, "batches_out_of_memory": out_of_memory}
        out_of_memory.append(batch)
        if batch // 2 < MIN_BATCH:
            raise RuntimeError(f"the UNet ran out of GPU memory at every batch from {shape.batch} down to {batch}")
        log(f"batch {batch} ran out of GPU memory; trying {batch // 2}")
        batch //= 2


# -- FLOPs -----------------------------------------------------------------------------------


def unet_flops_per_image(shape: BenchShape, batch: int) -> int:
    """FLOPs of the UNet's forward and backward per image at `batch`, counted on the meta device."""
    import torch
    import torch.nn.functional as F

    from train.unet import build_unet

    train = load_config(shape.preset).train
    side = shape.resolution // 8
    unet = build_unet(train.unet, shape.text_width, side, on_meta=True)
    latents = torch.empty(batch, 4, side, side, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    text = torch.empty(batch, 77, shape.text_width, device="meta")

    def step() -> None:
        F.mse_loss(unet(latents, timesteps, encoder_hidden_states=text).sample, latents).backward()

    return _count_flops(step) // batch


def vae_flops_per_image(shape: BenchShape) -> int:
    """FLOPs of the VAE encoder's forward per image, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config(shape.vae))
    pixels = torch.empty(shape.vae_batch, 3, shape.resolution, shape.resolution, device="meta")
    with torch.no_grad():
        return _count_flops(lambda: vae.encode(pixels).latent_dist.mean) // shape.vae_batch


def _count_flops(work) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def vae_config(name: str) -> dict[str, Any]:
    """The VAE's diffusers config: SD_VAE_CONFIG, or that of the model `name`."""
    from diffusers import AutoencoderKL

    from pipeline.core.models import resolve_model_path

    return dict(SD_VAE_CONFIG) if name == SD_VAE else dict(AutoencoderKL.load_config(resolve_model_path(name)))


def device_peak(device) -> dict[str, Any]:
    """The device's dense bf16 FLOP/s: from BF16_PEAK_TFLOPS by name, else a measured bf16 matrix product."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for part, tflops in BF16_PEAK_TFLOPS:
        if part in name:
            return {"device": name, "flops": tflops * 1e12, "source": f"table: {part} dense bf16"}
    side = 8192 if device.type == "cuda" else 512
    left, right = (torch.randn(side, side, device=device, dtype=torch.bfloat16) for _ in range(2))
    left @ right  # warm-up
    _synchronize(device)
    repeats = 10 if device.type == "cuda" else 3
    with Stopwatch() as watch:
        for _ in range(repeats):
            left @ right
        _synchronize(device)
    flops = 2 * side**3 * repeats / watch.seconds
    return {"device": name, "flops": flops, "source": f"measured: bf16 matrix product {side}^3 (not in the table)"}


# -- the worker processes --------------------------------------------------------------------


def run_worker(request: dict[str, Any], distributed: bool = False) -> dict[str, Any]:
    """`worker_main` in a fresh Python process; what it reports. `distributed`: with the
    environment of a single-rank process group on a free local port."""
    env = dict(os.environ)
    if distributed:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        env.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    command = [sys.executable, "-c", "from pipeline.bench.gpu import worker_main; worker_main()", json.dumps(request)]
    result = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    sys.stderr.write("".join(line + "\n" for line in lines[:-1]))  # libraries' prints (DeepSpeed's go to stdout)
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the {request['part']} worker exited with {result.returncode} (its stderr is above)")
    return json.loads(lines[-1])


def worker_main() -> None:
    """A worker process's entry point: the request as JSON in argv[1], the report as JSON on stdout's last line."""
    from pipeline.core import log as pipeline_log

    pipeline_log.setup_driver()
    request = json.loads(sys.argv[1])
    shape = BenchShape(**request["shape"])
    report = unet_worker(RunDir(request["run_url"]), shape, request["batch"]) if request["part"] == "unet" else vae_worker(shape)
    print(json.dumps(report), flush=True)


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device) -> float:
    """GiB: torch's peak allocated GPU memory, or on a CPU this process's peak RSS."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def train_config(shape: BenchShape, batch: int) -> PipelineConfig:
    """The preset's config for one worker of `batch` in bf16 with ZeRO-2, for the bench's steps."""
    total = shape.warmup_steps + shape.steps
    overrides = ["train.num_workers=1", "train.zero_stage=2", "train.precision=bf16", f"train.batch_size_per_worker={batch}"]
    overrides += ["train.gradient_accumulation=1", f"train.max_steps={total}", f"train.warmup_steps={total}"]
    return load_config(shape.preset, overrides=overrides)


def unet_worker(run: RunDir, shape: BenchShape, batch: int) -> dict[str, Any]:
    """Train the preset's UNet as one worker of the train stage does, on one device; timed after a warm-up.

    Reports {"out_of_memory": True} if a step runs out of GPU memory."""
    import deepspeed
    import torch

    from train import distributed
    from train.data import read_spec
    from train.ema import ExponentialMovingAverage
    from train.engine import make_engine
    from train.order import DataOrder
    from train.step import loss_options, make_noise_scheduler, train_step
    from train.stream import ShardStream
    from train.unet import build_unet, parameter_count

    device = _device()
    config = train_config(shape, batch)
    train = config.train
    torch.set_num_threads(train.threads_per_worker)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    spec = read_spec(run)
    distributed.seed_initial_weights(config.seed)
    unet = build_unet(train.unet, spec.cross_attention_dim, spec.sample_size)
    parameters = parameter_count(unet)
    log(f"{parameters / 1e6:.1f}M-parameter UNet on {device}, batch {batch}, bf16, ZeRO-2")
    engine = make_engine(unet, train)
    ema = ExponentialMovingAverage.of(engine, train)
    noise_scheduler, options = make_noise_scheduler(train), loss_options(train)
    empty_caption = torch.from_numpy(spec.empty_caption_embedding).float()
    order = DataOrder(spec.shard_counts, 1, train.shuffle_window_shards, config.seed)
    order.check(1, batch)
    positions = order.batches(0, 1, batch)
    stream = ShardStream(run, spec, pin=device.type == "cuda")
    read_seconds = 0.0  # waiting for the stream's batches, summed over the timed steps

    def step() -> None:
        nonlocal read_seconds
        position = next(positions)
        generator = distributed.batch_generator(config.seed, 0, position.epoch, position.taken)
        with Stopwatch() as read:
            data = stream.batch(position, generator)
        read_seconds += read.seconds
        train_step(engine, data, noise_scheduler, empty_caption, train.caption_dropout, generator, **options)
        if ema is not None and engine.was_step_applied():
            ema.update()

    try:
        for _ in range(shape.warmup_steps):
            step()
        _synchronize(device)
        read_seconds = 0.0
        with Stopwatch() as timed:
            for _ in range(shape.steps):
                step()
            _synchronize(device)
    except torch.OutOfMemoryError:
        return {"out_of_memory": True, "batch": batch}
    finally:
        stream.close()
        torch.distributed.destroy_process_group()
    images_per_s = shape.steps * batch / timed.seconds
    log(f"UNet: {images_per_s:.1f} images/s over {shape.steps} steps after {shape.warmup_steps} untimed")
    return {
        "images_per_s": round(images_per_s, 3),
        "peak_memory_gb": _peak_memory_gb(device),
        "batch": batch,
        "precision": "bf16",
        "zero_stage": 2,
        "preset": shape.preset,
        "unet": train.unet,
        "parameters": parameters,
        "latent_shape": list(spec.latent_shape),
        "cross_attention_dim": spec.cross_attention_dim,
        "ema": ema is not None,
        "steps": shape.steps,
        "warmup_steps": shape.warmup_steps,
        "seconds": round(timed.seconds, 3),
        "read_seconds": round(read_seconds, 3),
        "threads": train.threads_per_worker,
        "peak": device_peak(device),
    }


def vae_worker(shape: BenchShape) -> dict[str, Any]:
    """The encode stage's VAE path on random images, timed after a warm-up."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from ingest.encode.stage import encode_latents, to_model_input
    from pipeline.core.models import load_vae, vae_scaling_factor

    device = _device()
    encode = load_config(shape.preset).encode
    torch.set_num_threads(max(1, int(encode.cpus_per_actor)))  # as the encode actor does
    vae = AutoencoderKL(**SD_VAE_CONFIG).eval().requires_grad_(False) if shape.vae == SD_VAE else load_vae(shape.vae)
    vae.to(device)
    scaling_factor = vae_scaling_factor(vae)
    # The encode actor's autocast: bf16 on a GPU, none on a CPU (fp32 weights either way).
    precision = "bf16" if device.type == "cuda" else "fp32"
    images = np.random.default_rng(0).integers(0, 256, (shape.vae_batch, shape.resolution, shape.resolution, 3), dtype=np.uint8)

    def encode_batch() -> None:
        pixels = to_model_input(images).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            encode_latents(vae, pixels, scaling_factor, store_distribution=False)  # to host memory: synchronises

    for _ in range(shape.vae_warmup_batches):
        encode_batch()
    with Stopwatch() as timed:
        for _ in range(shape.vae_batches):
            encode_batch()
    images_per_s = shape.vae_batches * shape.vae_batch / timed.seconds
    log(f"VAE: {images_per_s:.1f} images/s at {shape.resolution} px, batches of {shape.vae_batch}")
    return {
        "images_per_s": round(images_per_s, 3),
        "peak_memory_gb": _peak_memory_gb(device),
        "resolution": shape.resolution,
        "batch": shape.vae_batch,
        "precision": precision,
        "vae": shape.vae,
        "batches": shape.vae_batches,
        "warmup_batches": shape.vae_warmup_batches,
        "seconds": round(timed.seconds, 3),
    }
