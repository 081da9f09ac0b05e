"""`pipeline plan`: what a run costs before you pay for it.

Every estimate is arithmetic over named assumptions, and every assumption carries its source:
a published figure (with its URL), a figure measured here by `pipeline bench`, or a count made
here. Pure functions over numbers; no torch, so the command answers at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.buckets import VAE_DOWNSAMPLE


class PlanError(ValueError):
    """Bad input; `option` names the CLI option to blame."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass(frozen=True)
class Assumption:
    name: str
    value: Any
    unit: str
    source: str


@dataclass(frozen=True)
class Estimate:
    name: str
    value: float
    unit: str
    formula: str
    uses: list[str] = field(default_factory=list)  # names of the assumptions (or inputs) it rests on


# FLOPs (matmul and conv, multiply-add = 2) counted with torch.utils.flop_counter.FlopCounterMode
# on meta-device models: the project's train.unet presets, the SD-1.5 VAE encoder config
# (128/256/512/512 channels, 2 layers per block) and CLIP ViT-L/14's text config (12 x 768).
# With latent side L = resolution/8 the count is exactly c + a*L^2 + b*L^4 (convs and linears
# grow with pixels, self-attention with pixels squared); test_plan.py recounts at 192 px.
FLOP_COUNT_SOURCE = "counted here: torch FlopCounterMode on the meta-device model (tests/pipeline/test_plan.py recounts)"
UNET_TRAIN_FLOPS = {  # forward + backward per sample, the backward counted too (about 2x forward)
    "sd15": (6_070_435_840, 496_391_280, 21_903.75),
    "tiny": (29_491_200, 9_344_256, 2_688),
}
VAE_ENCODE_FLOPS = {"sd15": (0, 264_233_088, 2_048), "tiny": (0, 6_042_752, 256)}  # encoder + quant_conv
TEXT_ENCODE_FLOPS = {"sd15": 13_298_503_680, "tiny": 13_128_192}  # 77 tokens, once per caption
TEXT_SHAPE = {"sd15": (77, 768), "tiny": (77, 64)}
LATENT_CHANNELS = 4
PARAMS = {"sd15": 859_520_964, "tiny": 4_192_900}  # UNet parameters, counted the same way


def quadratic_flops(coefficients: tuple[float, float, float], resolution: int) -> float:
    c, a, b = coefficients
    side = resolution / VAE_DOWNSAMPLE
    return c + a * side**2 + b * side**4


# Measured here on 2 shared CPU cores (README, "Seen on 2 cores").
BENCH_INGEST_IMAGES_PER_S = 421.0
BENCH_ENCODE_SAMPLES_PER_S = 188.6
BENCH_TRAIN_SAMPLES_PER_S = 111.7
DEMO_RAW_BYTES = (22_231_040, 3000, 64)  # runs/demo ingest/stats.json: bytes, images, px

IMG2DATASET = "img2dataset 1.47.0 README (https://github.com/rom1504/img2dataset#benchmarks)"


@dataclass(frozen=True)
class Device:
    peak_flops: float | None  # dense bf16 tensor-core peak; None: CPU, rated by the benches instead
    peak_source: str
    mfu: float
    price: float | None
    price_source: str
    per_node: int


AWS = "AWS EC2 on-demand list price, us-east-1 (https://aws.amazon.com/ec2/pricing/on-demand/); prices change, check"
ASSUMED_MFU = "assumed, not measured here; see the SD v1 cross-check"
DEVICES = {
    "A100-40GB": Device(
        312e12, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity), "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        0.4, 32.77 / 8, f"p4d.24xlarge $32.77/h / 8 GPUs; {AWS}", 8,
    ),
    "A100-80GB": Device(
        312e12, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity), "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        0.4, 40.96 / 8, f"p4de.24xlarge $40.96/h / 8 GPUs; {AWS}", 8,
    ),
    "H100": Device(
        989e12, "NVIDIA H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, half dense, "
        "https://www.nvidia.com/en-us/data-center/h100/",
        0.4, 98.32 / 8, f"p5.48xlarge $98.32/h / 8 GPUs; {AWS}", 8,
    ),
    "L4": Device(
        121e12, "NVIDIA L4: BF16 Tensor Core 242 TFLOPS with sparsity, half dense, https://www.nvidia.com/en-us/data-center/l4/",
        0.4, 0.805, f"g6.xlarge (1 L4, 4 vCPUs) $0.805/h; {AWS}", 1,
    ),
    "CPU": Device(
        None, "", 1.0, None, "no default: pass --price-per-gpu-hour", 1,
    ),  # one 2-core node like the one the benches ran on
}

# SD v1 model card (https://huggingface.co/CompVis/stable-diffusion-v1-4): batch 2048 throughout;
# v1-1 237k steps at 256 px + 194k at 512, v1-2 515k, v1-3 195k and v1-4 225k at 512;
# "Hardware Type: A100 PCIe 40GB", "Hours used: 150000".
SD_V1_CARD = "https://huggingface.co/CompVis/stable-diffusion-v1-4"
SD_V1_STEPS = {256: 237_000, 512: 194_000 + 515_000 + 195_000 + 225_000}
SD_V1_BATCH, SD_V1_HOURS = 2048, 150_000


@dataclass(frozen=True)
class PresetFacts:
    """What the plan needs from a preset's config."""

    name: str
    unet: str
    source: str  # ingest.source: toy or urls
    resolution: int
    steps: int
    global_batch: int
    latent_members: int
    vae_passes: int
    workers: int
    use_gpu: bool


def preset_facts(preset: str) -> PresetFacts:
    from pipeline.core.config import ConfigError, load_config

    name = {"sd15": "sd15-256"}.get(preset, preset)
    try:
        config = load_config(name)
    except ConfigError as error:
        raise PlanError("--preset", str(error)) from None
    train, encode = config.train, config.encode
    return PresetFacts(
        name=name,
        unet=train.unet,
        source=config.ingest.source,
        resolution=encode.resolution,
        steps=train.max_steps,
        global_batch=train.batch_size_per_worker * train.num_workers * train.gradient_accumulation,
        # As ingest/encode/stage.py stores them: mean (+ std), each also mirrored with flip_copies.
        latent_members=(2 if encode.store_distribution else 1) * (2 if encode.flip_copies else 1),
        vae_passes=2 if encode.flip_copies else 1,
        workers=train.num_workers,
        use_gpu=train.use_gpu,
    )


def find_device(name: str) -> tuple[str, Device]:
    for key, device in DEVICES.items():
        if key.lower() == name.lower() or (key == "H100" and name.lower() in ("h100-sxm", "h100-80gb")):
            return key, device
    raise PlanError("--gpu", f"unknown GPU {name!r}; choose one of {', '.join(DEVICES)}")


def plan(
    images: int,
    preset: PresetFacts,
    gpu: str | None = None,
    gpus: int | None = None,
    resolution: int | None = None,
    nodes: int | None = None,
    network_gbps: float = 10.0,
    price_per_gpu_hour: float | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    mfu: float | None = None,
    download_rate: float | None = None,
    raw_bytes_per_image: float | None = None,
) -> dict[str, Any]:
    """The assumptions and estimates of one run, as plain data (see `render`)."""
    gpu_given, gpus_given = gpu is not None, gpus is not None
    gpu, device = find_device(gpu or ("A100-80GB" if preset.use_gpu else "CPU"))
    gpus = preset.workers if gpus is None else gpus
    resolution = preset.resolution if resolution is None else resolution
    checks = [
        ("--images", images >= 1, "must be at least 1"),
        ("--gpus", gpus >= 1, "must be at least 1"),
        ("--resolution", resolution >= 64 and resolution % VAE_DOWNSAMPLE == 0, "must be a multiple of 8, at least 64"),
        ("--nodes", nodes is None or nodes >= 1, "must be at least 1"),
        ("--network-gbps", network_gbps > 0, "must be positive"),
        ("--price-per-gpu-hour", price_per_gpu_hour is None or price_per_gpu_hour >= 0, "must not be negative"),
        ("--epochs", epochs is None or epochs > 0, "must be positive"),
        ("--steps", steps is None or steps >= 1, "must be at least 1"),
        ("--epochs", epochs is None or steps is None, "give --epochs or --steps, not both"),
        ("--batch-size", batch_size is None or batch_size >= 1, "must be at least 1"),
        ("--mfu", mfu is None or 0 < mfu <= 1, "must be in (0, 1]"),
        ("--download-rate", download_rate is None or download_rate > 0, "must be positive"),
        ("--raw-bytes-per-image", raw_bytes_per_image is None or raw_bytes_per_image > 0, "must be positive"),
    ]
    for option, ok, message in checks:
        if not ok:
            raise PlanError(option, message)

    model = preset.unet
    nodes = nodes or math.ceil(gpus / device.per_node)
    assumptions: list[Assumption] = []

    def assume(name: str, value: Any, unit: str, source: str) -> Any:
        assumptions.append(Assumption(name, value, unit, source))
        return value

    given = "given (option)"
    assume("images", images, "images", "given (--images); every URL assumed to yield an image")
    assume("resolution", resolution, "px", given if resolution != preset.resolution else f"preset {preset.name} encode.resolution")
    assume("gpu", gpu, "", given if gpu_given else f"assumed: preset {preset.name} train.use_gpu = {str(preset.use_gpu).lower()}")
    assume("gpus", gpus, gpu, given if gpus_given else f"preset {preset.name} train.num_workers")
    assume("nodes", nodes, "nodes", f"{device.per_node} {gpu} per node" if nodes == math.ceil(gpus / device.per_node) else given)

    # Download -----------------------------------------------------------------------------
    if preset.source == "toy":
        rate = assume(
            "download_rate_per_node", download_rate or BENCH_INGEST_IMAGES_PER_S, "images/s",
            given if download_rate else "measured here: pipeline bench ingest on 2 CPU cores (toy images on loopback, no network)",
        )
        uses_download = ["images", "nodes", "download_rate_per_node"]
    else:
        published = assume(
            "download_rate_per_node", download_rate or 9500 / 10, "images/s",
            given if download_rate else f"{IMG2DATASET}, 5B benchmark: 5.8B images in 7 days on 10 machines, average 9500 sample/s",
        )
        wire = assume("wire_bytes_per_image", 130e3, "B", f"{IMG2DATASET}, architecture notes: 1000 average images/s need about 130 MB/s")
        assume("network_gbps", network_gbps, "Gbit/s per node", given if network_gbps != 10.0 else "assumed")
        rate = min(published, network_gbps * 1e9 / 8 / wire)
        uses_download = ["images", "nodes", "download_rate_per_node", "wire_bytes_per_image", "network_gbps"]
    download_s = images / (rate * nodes)

    # Storage ------------------------------------------------------------------------------
    if raw_bytes_per_image is None:
        if preset.source == "toy":
            raw_bytes, raw_images, raw_px = DEMO_RAW_BYTES
            base_source = f"measured here: make demo (tiny) ingest/stats.json, {raw_bytes:,} B for {raw_images:,} images at {raw_px} px"
        else:
            raw_bytes, raw_images, raw_px = 5e12, 190e6, 256
            base_source = f"{IMG2DATASET}, 190M benchmark: 190M images, 5 TB (resize settings not stated; default image_size 256)"
        raw_bytes_per_image = raw_bytes / raw_images * (resolution / raw_px) ** 2
        assume("raw_bytes_per_image", raw_bytes_per_image, "B", f"{base_source}; scaled with pixel count (assumed)")
    else:
        assume("raw_bytes_per_image", raw_bytes_per_image, "B", given)
    side = resolution // VAE_DOWNSAMPLE
    latent_elements = assume(
        "latent_elements", preset.latent_members * LATENT_CHANNELS * side * side, "fp16 values",
        f"{preset.latent_members} x {LATENT_CHANNELS} x {side} x {side}: SD VAE, 4 channels at 1/8 side (preset {preset.name} encode)",
    )
    text_elements = assume(
        "text_elements", math.prod(TEXT_SHAPE[model]), "fp16 values",
        "77 x 768: CLIP ViT-L/14 max_position_embeddings x hidden_size, https://huggingface.co/openai/clip-vit-large-patch14"
        if model == "sd15"
        else "77 x 64: builtin tiny text encoder, pipeline/core/assets/tiny/text_encoder/config.json",
    )
    sample_bytes = 2 * (latent_elements + text_elements)

    # Encode and train ---------------------------------------------------------------------
    if device.peak_flops is None:
        tiny_encode = quadratic_flops(VAE_ENCODE_FLOPS["tiny"], 64) + TEXT_ENCODE_FLOPS["tiny"]
        tiny_train = quadratic_flops(UNET_TRAIN_FLOPS["tiny"], 64)
        encode_rate = assume(
            "encode_flops_per_device", BENCH_ENCODE_SAMPLES_PER_S * tiny_encode, "FLOP/s",
            f"measured here: pipeline bench encode on 2 CPU cores, {BENCH_ENCODE_SAMPLES_PER_S} samples/s x the tiny encoders' FLOPs at 64 px",
        )
        train_rate = assume(
            "train_flops_per_device", BENCH_TRAIN_SAMPLES_PER_S * tiny_train, "FLOP/s",
            f"measured here: pipeline bench train on 2 CPU cores, {BENCH_TRAIN_SAMPLES_PER_S} samples/s x the tiny UNet's FLOPs at 64 px",
        )
        mfu = assume("mfu", mfu or device.mfu, "", given if mfu else "assumed 1: the CPU rates above are achieved rates, not peaks")
    else:
        peak = assume("gpu_peak_flops", device.peak_flops, "FLOP/s", device.peak_source)
        mfu = assume("mfu", mfu or device.mfu, "of peak, encode and train", given if mfu else ASSUMED_MFU)
        encode_rate = train_rate = peak
    rate_name = "gpu_peak_flops" if device.peak_flops else "encode_flops_per_device"
    train_rate_name = "gpu_peak_flops" if device.peak_flops else "train_flops_per_device"

    vae_flops = assume(
        "vae_encode_flops", preset.vae_passes * quadratic_flops(VAE_ENCODE_FLOPS[model], resolution), "FLOP/image",
        f"{FLOP_COUNT_SOURCE}; {'SD-1.5 VAE' if model == 'sd15' else 'builtin tiny VAE'} encoder at {resolution} px"
        + (", twice (flip_copies)" if preset.vae_passes == 2 else ""),
    )
    text_flops = assume(
        "text_encode_flops", TEXT_ENCODE_FLOPS[model], "FLOP/caption",
        f"{FLOP_COUNT_SOURCE}; {'CLIP ViT-L/14 text encoder (123M parameters)' if model == 'sd15' else 'builtin tiny text encoder'}, 77 tokens",
    )
    encode_gpu_s = images * (vae_flops + text_flops) / (encode_rate * mfu)

    if epochs is not None:
        assume("epochs", epochs, "passes over the images", given)
        samples = images * epochs
    else:
        steps = assume("steps", steps or preset.steps, "optimizer steps", given if steps else f"preset {preset.name} train.max_steps")
        batch = assume(
            "global_batch", batch_size or preset.global_batch, "samples/step",
            given if batch_size else f"preset {preset.name} train: batch_size_per_worker x num_workers x gradient_accumulation",
        )
        samples = steps * batch
    unet_flops = assume(
        "unet_train_flops", quadratic_flops(UNET_TRAIN_FLOPS[model], resolution), "FLOP/sample",
        f"{FLOP_COUNT_SOURCE}; UNet {model} ({PARAMS[model] / 1e6:.1f}M parameters) forward + backward at {resolution} px",
    )
    train_gpu_s = samples * unet_flops / (train_rate * mfu)

    if price_per_gpu_hour is not None:
        price = assume("price_per_gpu_hour", price_per_gpu_hour, "USD", given)
    else:
        price = assume("price_per_gpu_hour", device.price, "USD", device.price_source)
    assume("billing", "whole run", "", "assumed: the run holds its GPUs from download to the last step, as `pipeline run` does")

    hour = 3600.0
    run = "steps" if epochs is None else "epochs"
    estimates = [
        Estimate("download_hours", download_s / hour, "h", "images / (nodes x min(rate, network / wire bytes))", uses_download),
        Estimate("raw_shard_bytes", images * raw_bytes_per_image, "B", "images x raw_bytes_per_image", ["images", "raw_bytes_per_image"]),
        Estimate("bytes_per_sample", sample_bytes, "B", "2 x (latent_elements + text_elements) (fp16)", ["latent_elements", "text_elements"]),
        Estimate("latent_bytes", images * sample_bytes, "B", "images x bytes_per_sample", ["images", "latent_elements", "text_elements"]),
        Estimate(
            "storage_bytes", images * (raw_bytes_per_image + sample_bytes), "B", "raw_shard_bytes + latent_bytes",
            ["images", "raw_bytes_per_image", "latent_elements", "text_elements"],
        ),
        Estimate(
            "encode_gpu_hours", encode_gpu_s / hour, "GPU-h", "images x (vae + text FLOPs) / (peak x mfu)",
            ["images", "vae_encode_flops", "text_encode_flops", rate_name, "mfu"],
        ),
        Estimate(
            "encode_hours", encode_gpu_s / gpus / hour, "h", "encode_gpu_hours / gpus",
            ["gpus", "vae_encode_flops", "text_encode_flops", rate_name, "mfu"],
        ),
        Estimate(
            "train_samples", samples, "samples", "steps x global_batch" if run == "steps" else "images x epochs",
            ["steps", "global_batch"] if run == "steps" else ["images", "epochs"],
        ),
        Estimate("train_epochs", samples / images, "epochs", "train_samples / images", ["images", run]),
        Estimate(
            "train_gpu_hours", train_gpu_s / hour, "GPU-h", "train_samples x unet_train_flops / (peak x mfu)",
            [run, "unet_train_flops", train_rate_name, "mfu"],
        ),
        Estimate("train_hours", train_gpu_s / gpus / hour, "h", "train_gpu_hours / gpus", ["gpus", "unet_train_flops", train_rate_name, "mfu"]),
    ]
    wall_s = download_s + (encode_gpu_s + train_gpu_s) / gpus
    estimates.append(Estimate("total_hours", wall_s / hour, "h", "download + encode + train, one after another", ["gpus", "nodes"]))
    estimates.append(
        Estimate(
            "cost_usd", None if price is None else wall_s / hour * gpus * price, "USD",
            "total_hours x gpus x price_per_gpu_hour", ["price_per_gpu_hour", "billing", "gpus"],
        )
    )
    if model == "sd15":
        # SD v1's schedule through the same FLOP model, counting the VAE and CLIP it ran every
        # step (no cached latents then), against the GPU-hours its card reports.
        assume("sd_v1_schedule", "237k steps at 256 px, 1,129k at 512 px, batch 2048", "",
               f"SD v1 model card, v1-1 to v1-4, {SD_V1_CARD}")  # fmt: skip
        assume("sd_v1_hours", SD_V1_HOURS, "A100-h", f"SD v1 model card: Hardware Type A100 PCIe 40GB, Hours used 150000, {SD_V1_CARD}")
        sd_flops = sum(
            steps_at * SD_V1_BATCH * (
                quadratic_flops(UNET_TRAIN_FLOPS["sd15"], px) + quadratic_flops(VAE_ENCODE_FLOPS["sd15"], px) + TEXT_ENCODE_FLOPS["sd15"]
            )
            for px, steps_at in SD_V1_STEPS.items()
        )  # fmt: skip
        a100 = DEVICES["A100-40GB"].peak_flops
        uses = ["sd_v1_schedule", "unet_train_flops", "vae_encode_flops", "mfu"]
        estimates.append(
            Estimate("check_sd_v1_a100_hours", sd_flops / (a100 * mfu) / hour, "A100-h", "SD v1 schedule FLOPs / (312 TFLOP/s x mfu)", uses)
        )
        estimates.append(
            Estimate(
                "check_sd_v1_implied_mfu", sd_flops / (a100 * SD_V1_HOURS * hour), "",
                "SD v1 schedule FLOPs / (312 TFLOP/s x sd_v1_hours)", uses[:-1] + ["sd_v1_hours"],
            )
        )
    return {
        "inputs": {"images": images, "resolution": resolution, "preset": preset.name, "gpu": gpu, "gpus": gpus, "nodes": nodes},
        "assumptions": {a.name: {"value": a.value, "unit": a.unit, "source": a.source} for a in assumptions},
        "estimates": {e.name: {k: v for k, v in asdict(e).items() if k != "name"} for e in estimates},
    }


def _number(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if unit == "B":
        for scale, suffix in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.3g} {suffix} ({value:,.0f} B)"
        return f"{value:,.0f} B"
    if unit == "USD":
        return f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"
    if unit == "FLOP/s":
        return f"{value / 1e12:.4g} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.4g} GFLOP/s"
    if unit.startswith("FLOP/"):
        return f"{value / 1e9:,.4g} GFLOP{unit[4:]}"
    if unit == "h" and value >= 48:
        return f"{value:,.1f} h ({value / 24:,.1f} days)"
    if unit == "h" and value < 1:
        return f"{value:.3g} h ({value * 60:.3g} min)" if value >= 1 / 60 else f"{value:.3g} h ({value * 3600:.3g} s)"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return f"{text} {unit}".rstrip()


def render(result: dict[str, Any]) -> str:
    """The human table: assumptions with their sources, then estimates naming the assumptions used."""
    inputs = result["inputs"]
    lines = [
        (
            f"pipeline plan: {inputs['images']:,} images at {inputs['resolution']} px, preset {inputs['preset']}, "
            f"{inputs['gpus']} x {inputs['gpu']} on {inputs['nodes']} node(s)"
        ),
        "",
        "Assumptions",
    ]
    width = max(map(len, result["assumptions"]))
    values = {name: _number(a["value"], a["unit"]) for name, a in result["assumptions"].items()}
    value_width = max(map(len, values.values()))
    for name, a in result["assumptions"].items():
        lines.append(f"  {name:<{width}}  {values[name]:<{value_width}}  {a['source']}")
    lines += ["", "Estimates"]
    width = max(map(len, result["estimates"]))
    shown = {name: _number(e["value"], e["unit"]) for name, e in result["estimates"].items()}
    value_width = max(map(len, shown.values()))
    for name, e in result["estimates"].items():
        lines.append(f"  {name:<{width}}  {shown[name]:<{value_width}}  = {e['formula']}  [{', '.join(e['uses'])}]")
    return "\n".join(lines)
