"""`pipeline plan`: what a run costs before you pay for it.

Every estimate is arithmetic over named assumptions, and every assumption carries its source:
a published figure (with its URL), a figure measured here by `pipeline bench`, or a count made
here. Pure functions over numbers; no torch, so the command answers at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
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
    high: float | None = None  # at mfu_low, where the MFU was assumed: the range is value to high


# FLOPs (matmul and conv, multiply-add = 2) counted with torch.utils.flop_counter.FlopCounterMode
# on meta-device models: the project's train.unet presets, the SD-1.5 VAE encoder config
# (128/256/512/512 channels, 2 layers per block) and CLIP ViT-L/14's text config (12 x 768).
# With latent side L = resolution/8 the count is exactly c + a*L^2 + b*L^4 (convs and linears
# grow with pixels, self-attention with pixels squared); test_plan.py recounts at 192 px.
FLOP_COUNT_SOURCE = "counted here: torch FlopCounterMode on the meta-device model (tests/pipeline/test_plan.py recounts)"
UNET_TRAIN_FLOPS = {  # forward + backward per sample, the backward counted too (about 2x forward)
    "sd15": (6_070_435_840, 496_391_280, 21_903.75),
    "tiny": (29_491_200, 9_344_256, 2_688),
    "micro": (14_311_424, 2_415_744, 1_344),
}
VAE_ENCODE_FLOPS = {"sd15": (0, 264_233_088, 2_048), "tiny": (0, 6_042_752, 256)}  # encoder + quant_conv
TEXT_ENCODE_FLOPS = {"sd15": 13_298_503_680, "tiny": 13_128_192}  # 77 tokens, once per caption
TEXT_SHAPE = {"sd15": (77, 768), "tiny": (77, 64)}
LATENT_CHANNELS = 4
PARAMS = {"sd15": 859_520_964, "tiny": 4_192_900, "micro": 1_077_572}  # UNet parameters, counted the same way


def quadratic_flops(coefficients: tuple[float, float, float], resolution: int) -> float:
    c, a, b = coefficients
    side = resolution / VAE_DOWNSAMPLE
    return c + a * side**2 + b * side**4


# Measured here on 2 shared CPU cores (docs/development.md, benchmarks).
BENCH_INGEST_IMAGES_PER_S = 421.0
BENCH_ENCODE_SAMPLES_PER_S = 188.6
BENCH_TRAIN_SAMPLES_PER_S = 276.1  # the micro UNet (111.7 with the 4.2M tiny one)
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
        312e12,
        "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity), "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        0.4,
        32.77 / 8,
        f"p4d.24xlarge $32.77/h / 8 GPUs; {AWS}",
        8,
    ),
    "A100-80GB": Device(
        312e12,
        "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity), "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        0.4,
        40.96 / 8,
        f"p4de.24xlarge $40.96/h / 8 GPUs; {AWS}",
        8,
    ),
    "H100": Device(
        989e12,
        "NVIDIA H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, half dense, "
        "https://www.nvidia.com/en-us/data-center/h100/",
        0.4,
        98.32 / 8,
        f"p5.48xlarge $98.32/h / 8 GPUs; {AWS}",
        8,
    ),
    "L4": Device(
        121e12,
        "NVIDIA L4: BF16 Tensor Core 242 TFLOPS with sparsity, half dense, https://www.nvidia.com/en-us/data-center/l4/",
        0.4,
        0.805,
        f"g6.xlarge (1 L4, 4 vCPUs) $0.805/h; {AWS}",
        1,
    ),
    "CPU": Device(
        None,
        "",
        1.0,
        None,
        "no default: pass --price-per-gpu-hour",
        1,
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
    encoders: str  # the VAE and text encoder: "tiny" (builtin) or "sd15"
    source: str  # ingest.source: toy or urls
    resolution: int
    steps: int
    global_batch: int
    latent_members: int
    vae_passes: int
    workers: int
    use_gpu: bool
    encode_actors: int  # encode.num_actors: encode runs on this many devices, however many the run holds


def preset_facts(preset: str) -> PresetFacts:
    from pipeline.core.config import ConfigError, load_config, preset_name

    try:
        name = preset_name(preset)  # an alias (sd15) as every command takes it
        config = load_config(name)
    except ConfigError as error:
        raise PlanError("--preset", str(error)) from None
    train, encode = config.train, config.encode
    return PresetFacts(
        name=name,
        unet=train.unet,
        encoders="tiny" if encode.vae.startswith("builtin:") else "sd15",
        source=config.ingest.source,
        resolution=encode.resolution,
        steps=train.max_steps,
        global_batch=train.batch_size_per_worker * train.num_workers * train.gradient_accumulation,
        # As ingest/encode/stage.py stores them: mean (+ std), each also mirrored with flip_copies.
        latent_members=(2 if encode.store_distribution else 1) * (2 if encode.flip_copies else 1),
        vae_passes=2 if encode.flip_copies else 1,
        workers=train.num_workers,
        use_gpu=train.use_gpu,
        encode_actors=encode.num_actors,
    )


def find_device(name: str) -> tuple[str, Device]:
    for key, device in DEVICES.items():
        if key.lower() == name.lower() or (key == "H100" and name.lower() in ("h100-sxm", "h100-80gb")):
            return key, device
    raise PlanError("--gpu", f"unknown GPU {name!r}; choose one of {', '.join(DEVICES)}")


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """What `pipeline plan` is asked; None takes the preset's (or the GPU's) default."""

    images: int
    """Images (URLs) in the run."""
    preset: PresetFacts
    """Model shapes, steps and batch of the preset (see `preset_facts`)."""
    gpu: str | None = None
    """A key of DEVICES (A100-40GB, A100-80GB, H100, L4, CPU); None: A100-80GB if the preset trains on GPUs, else CPU."""
    gpus: int | None = None
    """GPUs (CPU: nodes) in all; None: the preset's train.num_workers."""
    encode_actors: int | None = None
    """Encoder actors, one device each (at most `gpus`); None: the preset's encode.num_actors."""
    resolution: int | None = None
    """Image side in px; None: the preset's encode.resolution."""
    nodes: int | None = None
    """Nodes that download; None: GPUs / GPUs per node."""
    network_gbps: float = 10.0
    """Network per node, Gbit/s (caps the download rate of URL sources)."""
    price_per_gpu_hour: float | None = None
    """USD; None: the GPU's AWS on-demand price."""
    epochs: float | None = None
    """Train this many passes over the images; excludes `steps`."""
    steps: int | None = None
    """Optimizer steps; None (and no epochs): the preset's train.max_steps."""
    batch_size: int | None = None
    """Global batch; None: the preset's."""
    mfu: float | None = None
    """Achieved fraction of peak FLOP/s, encode and train; None: the device's assumed one."""
    download_rate: float | None = None
    """Images/s per node; None: the bench (toy source) or img2dataset's published rate."""
    raw_bytes_per_image: float | None = None
    """Raw shard bytes per image; None: measured or published bytes, scaled with pixel count."""


@dataclass(frozen=True)
class Setup:
    """The inputs' device, counts and resolution with their defaults filled in, checked."""

    gpu: str
    device: Device
    gpus: int
    resolution: int
    nodes: int
    encoders: int  # devices encoding at once: encode actors, at most the GPUs


@dataclass(frozen=True)
class Rates:
    """Achieved FLOP/s of one device for encode and train, and the assumptions they rest on."""

    encode: float
    train: float
    mfu: float
    encode_name: str  # the assumption giving `encode`
    train_name: str


@dataclass
class Ledger:
    """What `plan` writes down as it goes: the assumptions, then the estimates resting on them."""

    assumptions: list[Assumption] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)

    def assume(self, name: str, value: Any, unit: str, source: str) -> Any:
        self.assumptions.append(Assumption(name, value, unit, source))
        return value

    def estimate(self, name: str, value: float | None, unit: str, formula: str, uses: list[str]) -> None:
        self.estimates.append(Estimate(name, value, unit, formula, uses))


GIVEN = "given (option)"
HOUR = 3600.0


def plan(inputs: PlanInputs) -> dict[str, Any]:
    """The assumptions and estimates of one run, as plain data (see `render`). Where a GPU's MFU is assumed
    rather than given, each estimate resting on it also carries `high`: its value at `mfu_low`, the MFU SD v1's
    own training achieved by this FLOP model, so the plan reads as a range."""
    setup, ledger = _ledger(inputs)
    if inputs.mfu is None and setup.device.peak_flops is not None:
        low = sd_v1_flops() / (DEVICES["A100-40GB"].peak_flops * SD_V1_HOURS * HOUR)
        mfu_at = next(index for index, a in enumerate(ledger.assumptions) if a.name == "mfu") + 1
        ledger.assumptions.insert(
            mfu_at,
            Assumption(
                "mfu_low",
                low,
                "of peak",
                f"the low end of every range: what SD v1's training achieved by this FLOP model (its model card's "
                f"{SD_V1_HOURS:,} A100-h, {SD_V1_CARD}; check_sd_v1_implied_mfu)",
            ),
        )
        _, slow = _ledger(replace(inputs, mfu=low))
        ledger.estimates = [
            replace(estimate, high=other.value, uses=[*estimate.uses, "mfu_low"])
            if not estimate.name.startswith("check_") and estimate.value is not None and other.value != estimate.value
            else estimate
            for estimate, other in zip(ledger.estimates, slow.estimates, strict=True)
        ]
    return {
        "inputs": {
            "images": inputs.images,
            "resolution": setup.resolution,
            "preset": inputs.preset.name,
            "gpu": setup.gpu,
            "gpus": setup.gpus,
            "nodes": setup.nodes,
            "encode_actors": setup.encoders,
        },
        "assumptions": {a.name: {"value": a.value, "unit": a.unit, "source": a.source} for a in ledger.assumptions},
        "estimates": {e.name: {k: v for k, v in asdict(e).items() if k != "name"} for e in ledger.estimates},
    }


def _ledger(inputs: PlanInputs) -> tuple[Setup, Ledger]:
    setup = resolve(inputs)
    ledger = Ledger()
    assume_inputs(ledger, inputs, setup)
    download_s = estimate_download(ledger, inputs, setup)
    estimate_storage(ledger, inputs, setup)
    rates = assume_rates(ledger, inputs, setup)
    encode_s = estimate_encode(ledger, inputs, setup, rates)
    train_gpu_s = estimate_train(ledger, inputs, setup, rates)
    estimate_total_and_cost(ledger, inputs, setup, download_s + encode_s + train_gpu_s / setup.gpus)
    if inputs.preset.unet == "sd15":
        check_against_sd_v1(ledger, rates.mfu)
    return setup, ledger


def resolve(inputs: PlanInputs) -> Setup:
    """Fill in the defaults and check every option, raising PlanError for the first bad one."""
    preset = inputs.preset
    gpu, device = find_device(inputs.gpu or ("A100-80GB" if preset.use_gpu else "CPU"))
    gpus = preset.workers if inputs.gpus is None else inputs.gpus
    resolution = preset.resolution if inputs.resolution is None else inputs.resolution
    checks = [
        ("--images", inputs.images >= 1, "must be at least 1"),
        ("--gpus", gpus >= 1, "must be at least 1"),
        ("--encode-actors", inputs.encode_actors is None or inputs.encode_actors >= 1, "must be at least 1"),
        ("--resolution", resolution >= 64 and resolution % VAE_DOWNSAMPLE == 0, "must be a multiple of 8, at least 64"),
        ("--nodes", inputs.nodes is None or inputs.nodes >= 1, "must be at least 1"),
        ("--network-gbps", inputs.network_gbps > 0, "must be positive"),
        ("--price-per-gpu-hour", inputs.price_per_gpu_hour is None or inputs.price_per_gpu_hour >= 0, "must not be negative"),
        ("--epochs", inputs.epochs is None or inputs.epochs > 0, "must be positive"),
        ("--steps", inputs.steps is None or inputs.steps >= 1, "must be at least 1"),
        ("--epochs", inputs.epochs is None or inputs.steps is None, "give --epochs or --steps, not both"),
        ("--batch-size", inputs.batch_size is None or inputs.batch_size >= 1, "must be at least 1"),
        ("--mfu", inputs.mfu is None or 0 < inputs.mfu <= 1, "must be in (0, 1]"),
        ("--download-rate", inputs.download_rate is None or inputs.download_rate > 0, "must be positive"),
        ("--raw-bytes-per-image", inputs.raw_bytes_per_image is None or inputs.raw_bytes_per_image > 0, "must be positive"),
    ]
    for option, ok, message in checks:
        if not ok:
            raise PlanError(option, message)
    actors = preset.encode_actors if inputs.encode_actors is None else inputs.encode_actors
    nodes = inputs.nodes or math.ceil(gpus / device.per_node)
    return Setup(gpu, device, gpus, resolution, nodes, encoders=min(actors, gpus))


def assume_inputs(ledger: Ledger, inputs: PlanInputs, setup: Setup) -> None:
    """The run's size and hardware, each saying whether it was given or taken from the preset."""
    preset, gpu = inputs.preset, setup.gpu
    resolution_source = GIVEN if setup.resolution != preset.resolution else f"preset {preset.name} encode.resolution"
    gpu_source = (
        GIVEN if inputs.gpu is not None else f"assumed: preset {preset.name} train.use_gpu = {str(preset.use_gpu).lower()}"
    )
    nodes_default = setup.nodes == math.ceil(setup.gpus / setup.device.per_node)
    ledger.assume("images", inputs.images, "images", "given (--images); every URL assumed to yield an image")
    ledger.assume("resolution", setup.resolution, "px", resolution_source)
    ledger.assume("gpu", gpu, "", gpu_source)
    ledger.assume("gpus", setup.gpus, gpu, GIVEN if inputs.gpus is not None else f"preset {preset.name} train.num_workers")
    ledger.assume("nodes", setup.nodes, "nodes", f"{setup.device.per_node} {gpu} per node" if nodes_default else GIVEN)
    actors_source = GIVEN if inputs.encode_actors is not None else f"preset {preset.name} encode.num_actors"
    if setup.encoders < (inputs.encode_actors or preset.encode_actors):
        actors_source += f", at most one per GPU ({setup.gpus})"
    ledger.assume("encode_actors", setup.encoders, "actors", actors_source)


def estimate_download(ledger: Ledger, inputs: PlanInputs, setup: Setup) -> float:
    """Seconds to download every image: the bench's rate for toy images, else img2dataset's capped by the network."""
    given_rate = inputs.download_rate
    if inputs.preset.source == "toy":
        rate = ledger.assume(
            "download_rate_per_node",
            given_rate or BENCH_INGEST_IMAGES_PER_S,
            "images/s",
            GIVEN if given_rate else "measured here: pipeline bench ingest on 2 CPU cores (toy images on loopback, no network)",
        )
        uses = ["images", "nodes", "download_rate_per_node"]
    else:
        published = ledger.assume(
            "download_rate_per_node",
            given_rate or 9500 / 10,
            "images/s",
            GIVEN if given_rate else f"{IMG2DATASET}, 5B benchmark: 5.8B images in 7 days on 10 machines, average 9500 sample/s",
        )
        wire = ledger.assume(
            "wire_bytes_per_image", 130e3, "B", f"{IMG2DATASET}, architecture notes: 1000 average images/s need about 130 MB/s"
        )
        network_gbps = inputs.network_gbps
        ledger.assume("network_gbps", network_gbps, "Gbit/s per node", GIVEN if network_gbps != 10.0 else "assumed")
        rate = min(published, network_gbps * 1e9 / 8 / wire)
        uses = ["images", "nodes", "download_rate_per_node", "wire_bytes_per_image", "network_gbps"]
    download_s = inputs.images / (rate * setup.nodes)
    ledger.estimate("download_hours", download_s / HOUR, "h", "images / (nodes x min(rate, network / wire bytes))", uses)
    return download_s


def estimate_storage(ledger: Ledger, inputs: PlanInputs, setup: Setup) -> None:
    """Raw shard bytes (given, or measured/published and scaled with pixels) and fp16 latent + text bytes."""
    images, preset, model, resolution = inputs.images, inputs.preset, inputs.preset.encoders, setup.resolution
    raw_bytes_per_image = inputs.raw_bytes_per_image
    if raw_bytes_per_image is None:
        if preset.source == "toy":
            raw_bytes, raw_images, raw_px = DEMO_RAW_BYTES
            base_source = (
                f"measured here: make demo (tiny) ingest/stats.json, {raw_bytes:,} B for {raw_images:,} images at {raw_px} px"
            )
        else:
            raw_bytes, raw_images, raw_px = 5e12, 190e6, 256
            base_source = f"{IMG2DATASET}, 190M benchmark: 190M images, 5 TB (resize settings not stated; default image_size 256)"
        raw_bytes_per_image = raw_bytes / raw_images * (resolution / raw_px) ** 2
        ledger.assume("raw_bytes_per_image", raw_bytes_per_image, "B", f"{base_source}; scaled with pixel count (assumed)")
    else:
        ledger.assume("raw_bytes_per_image", raw_bytes_per_image, "B", GIVEN)
    side = resolution // VAE_DOWNSAMPLE
    latent_elements = ledger.assume(
        "latent_elements",
        preset.latent_members * LATENT_CHANNELS * side * side,
        "fp16 values",
        f"{preset.latent_members} x {LATENT_CHANNELS} x {side} x {side}: SD VAE, 4 channels at 1/8 side (preset {preset.name} encode)",
    )
    text_elements = ledger.assume(
        "text_elements",
        math.prod(TEXT_SHAPE[model]),
        "fp16 values",
        "77 x 768: CLIP ViT-L/14 max_position_embeddings x hidden_size, https://huggingface.co/openai/clip-vit-large-patch14"
        if model == "sd15"
        else "77 x 64: builtin tiny text encoder, pipeline/core/assets/tiny/text_encoder/config.json",
    )
    sample_bytes = 2 * (latent_elements + text_elements)
    ledger.estimate(
        "raw_shard_bytes", images * raw_bytes_per_image, "B", "images x raw_bytes_per_image", ["images", "raw_bytes_per_image"]
    )
    ledger.estimate(
        "bytes_per_sample",
        sample_bytes,
        "B",
        "2 x (latent_elements + text_elements) (fp16)",
        ["latent_elements", "text_elements"],
    )
    ledger.estimate(
        "latent_bytes", images * sample_bytes, "B", "images x bytes_per_sample", ["images", "latent_elements", "text_elements"]
    )
    ledger.estimate(
        "storage_bytes",
        images * (raw_bytes_per_image + sample_bytes),
        "B",
        "raw_shard_bytes + latent_bytes",
        ["images", "raw_bytes_per_image", "latent_elements", "text_elements"],
    )


def assume_rates(ledger: Ledger, inputs: PlanInputs, setup: Setup) -> Rates:
    """FLOP/s per device: a GPU's datasheet peak, or on CPU the bench rates of the tiny models."""
    device, mfu = setup.device, inputs.mfu
    if device.peak_flops is None:
        tiny_encode = quadratic_flops(VAE_ENCODE_FLOPS["tiny"], 64) + TEXT_ENCODE_FLOPS["tiny"]
        tiny_train = quadratic_flops(UNET_TRAIN_FLOPS["micro"], 64)  # the tiny preset's UNet, which the bench trains
        encode_rate = ledger.assume(
            "encode_flops_per_device",
            BENCH_ENCODE_SAMPLES_PER_S * tiny_encode,
            "FLOP/s",
            f"measured here: pipeline bench encode on 2 CPU cores, {BENCH_ENCODE_SAMPLES_PER_S} samples/s x the tiny encoders' FLOPs at 64 px",
        )
        train_rate = ledger.assume(
            "train_flops_per_device",
            BENCH_TRAIN_SAMPLES_PER_S * tiny_train,
            "FLOP/s",
            f"measured here: pipeline bench train on 2 CPU cores, {BENCH_TRAIN_SAMPLES_PER_S} samples/s x the tiny preset's UNet's (micro) FLOPs at 64 px",
        )
        mfu = ledger.assume(
            "mfu", mfu or device.mfu, "", GIVEN if mfu else "assumed 1: the CPU rates above are achieved rates, not peaks"
        )
    else:
        peak = ledger.assume("gpu_peak_flops", device.peak_flops, "FLOP/s", device.peak_source)
        mfu = ledger.assume("mfu", mfu or device.mfu, "of peak, encode and train", GIVEN if mfu else ASSUMED_MFU)
        encode_rate = train_rate = peak
    return Rates(
        encode_rate,
        train_rate,
        mfu,
        encode_name="gpu_peak_flops" if device.peak_flops else "encode_flops_per_device",
        train_name="gpu_peak_flops" if device.peak_flops else "train_flops_per_device",
    )


def estimate_encode(ledger: Ledger, inputs: PlanInputs, setup: Setup, rates: Rates) -> float:
    """GPU-seconds to encode every image (VAE, once per flip copy) and caption (text encoder)."""
    preset, model, resolution = inputs.preset, inputs.preset.encoders, setup.resolution
    vae_flops = ledger.assume(
        "vae_encode_flops",
        preset.vae_passes * quadratic_flops(VAE_ENCODE_FLOPS[model], resolution),
        "FLOP/image",
        f"{FLOP_COUNT_SOURCE}; {'SD-1.5 VAE' if model == 'sd15' else 'builtin tiny VAE'} encoder at {resolution} px"
        + (", twice (flip_copies)" if preset.vae_passes == 2 else ""),
    )
    text_flops = ledger.assume(
        "text_encode_flops",
        TEXT_ENCODE_FLOPS[model],
        "FLOP/caption",
        f"{FLOP_COUNT_SOURCE}; {'CLIP ViT-L/14 text encoder (123M parameters)' if model == 'sd15' else 'builtin tiny text encoder'}, 77 tokens",
    )
    encode_gpu_s = inputs.images * (vae_flops + text_flops) / (rates.encode * rates.mfu)
    uses = ["vae_encode_flops", "text_encode_flops", rates.encode_name, "mfu"]
    ledger.estimate(
        "encode_gpu_hours", encode_gpu_s / HOUR, "GPU-h", "images x (vae + text FLOPs) / (peak x mfu)", ["images", *uses]
    )
    encode_s = encode_gpu_s / setup.encoders
    ledger.estimate("encode_hours", encode_s / HOUR, "h", "encode_gpu_hours / encode_actors", ["encode_actors", *uses])
    if setup.encoders < setup.gpus:  # billed meanwhile (`billing`)
        ledger.estimate(
            "encode_idle_gpu_hours",
            encode_s * (setup.gpus - setup.encoders) / HOUR,
            "GPU-h",
            "encode_hours x (gpus - encode_actors): held, not encoding; more encode actors shorten it",
            ["gpus", "encode_actors", *uses],
        )
    return encode_s


def estimate_train(ledger: Ledger, inputs: PlanInputs, setup: Setup, rates: Rates) -> float:
    """GPU-seconds to train: samples (epochs x images, or steps x global batch) x the UNet's FLOPs."""
    images, preset, model, resolution = inputs.images, inputs.preset, inputs.preset.unet, setup.resolution
    if inputs.epochs is not None:
        ledger.assume("epochs", inputs.epochs, "passes over the images", GIVEN)
        samples = images * inputs.epochs
        run, formula, uses = "epochs", "images x epochs", ["images", "epochs"]
    else:
        steps = ledger.assume(
            "steps",
            inputs.steps or preset.steps,
            "optimizer steps",
            GIVEN if inputs.steps else f"preset {preset.name} train.max_steps",
        )
        batch = ledger.assume(
            "global_batch",
            inputs.batch_size or preset.global_batch,
            "samples/step",
            GIVEN
            if inputs.batch_size
            else f"preset {preset.name} train: batch_size_per_worker x num_workers x gradient_accumulation",
        )
        samples = steps * batch
        run, formula, uses = "steps", "steps x global_batch", ["steps", "global_batch"]
    unet_flops = ledger.assume(
        "unet_train_flops",
        quadratic_flops(UNET_TRAIN_FLOPS[model], resolution),
        "FLOP/sample",
        f"{FLOP_COUNT_SOURCE}; UNet {model} ({PARAMS[model] / 1e6:.1f}M parameters) forward + backward at {resolution} px",
    )
    train_gpu_s = samples * unet_flops / (rates.train * rates.mfu)
    flops_uses = ["unet_train_flops", rates.train_name, "mfu"]
    ledger.estimate("train_samples", samples, "samples", formula, uses)
    ledger.estimate("train_epochs", samples / images, "epochs", "train_samples / images", ["images", run])
    ledger.estimate(
        "train_gpu_hours", train_gpu_s / HOUR, "GPU-h", "train_samples x unet_train_flops / (peak x mfu)", [run, *flops_uses]
    )
    ledger.estimate("train_hours", train_gpu_s / setup.gpus / HOUR, "h", "train_gpu_hours / gpus", ["gpus", *flops_uses])
    return train_gpu_s


def estimate_total_and_cost(ledger: Ledger, inputs: PlanInputs, setup: Setup, wall_s: float) -> None:
    """Wall time with the stages one after another, and its price with every GPU billed throughout."""
    if inputs.price_per_gpu_hour is not None:
        price = ledger.assume("price_per_gpu_hour", inputs.price_per_gpu_hour, "USD", GIVEN)
    else:
        price = ledger.assume("price_per_gpu_hour", setup.device.price, "USD", setup.device.price_source)
    ledger.assume(
        "billing", "whole run", "", "assumed: the run holds its GPUs from download to the last step, as `pipeline run` does"
    )
    ledger.estimate(
        "total_hours", wall_s / HOUR, "h", "download + encode + train, one after another", ["gpus", "nodes", "encode_actors"]
    )
    ledger.estimate(
        "cost_usd",
        None if price is None else wall_s / HOUR * setup.gpus * price,
        "USD",
        "total_hours x gpus x price_per_gpu_hour",
        ["price_per_gpu_hour", "billing", "gpus"],
    )


def sd_v1_flops() -> float:
    """SD v1's schedule (SD_V1_STEPS at SD_V1_BATCH) in FLOPs, the VAE and CLIP run every step (no cached latents then)."""
    return sum(
        steps_at
        * SD_V1_BATCH
        * (
            quadratic_flops(UNET_TRAIN_FLOPS["sd15"], px)
            + quadratic_flops(VAE_ENCODE_FLOPS["sd15"], px)
            + TEXT_ENCODE_FLOPS["sd15"]
        )
        for px, steps_at in SD_V1_STEPS.items()
    )


def check_against_sd_v1(ledger: Ledger, mfu: float) -> None:
    """SD v1's schedule through the same FLOP model, against the GPU-hours its model card reports.

    It counts the VAE and CLIP that SD v1 ran every step (no cached latents then).
    """
    schedule = "237k steps at 256 px, 1,129k at 512 px, batch 2048"
    ledger.assume("sd_v1_schedule", schedule, "", f"SD v1 model card, v1-1 to v1-4, {SD_V1_CARD}")
    ledger.assume(
        "sd_v1_hours", SD_V1_HOURS, "A100-h", f"SD v1 model card: Hardware Type A100 PCIe 40GB, Hours used 150000, {SD_V1_CARD}"
    )
    sd_flops = sd_v1_flops()
    a100 = DEVICES["A100-40GB"].peak_flops
    uses = ["sd_v1_schedule", "unet_train_flops", "vae_encode_flops", "mfu"]
    ledger.estimate(
        "check_sd_v1_a100_hours", sd_flops / (a100 * mfu) / HOUR, "A100-h", "SD v1 schedule FLOPs / (312 TFLOP/s x mfu)", uses
    )
    ledger.estimate(
        "check_sd_v1_implied_mfu",
        sd_flops / (a100 * SD_V1_HOURS * HOUR),
        "",
        "SD v1 schedule FLOPs / (312 TFLOP/s x sd_v1_hours)",
        uses[:-1] + ["sd_v1_hours"],
    )


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
            f"{inputs['gpus']} x {inputs['gpu']} on {inputs['nodes']} node(s), encode on {inputs['encode_actors']} actor(s)"
        ),
        *(["'X to Y': X at the assumed mfu, Y at mfu_low"] if "mfu_low" in result["assumptions"] else []),
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
    shown = {
        name: _number(e["value"], e["unit"]) + (f" to {_number(e['high'], e['unit'])}" if e.get("high") is not None else "")
        for name, e in result["estimates"].items()
    }
    value_width = max(map(len, shown.values()))
    for name, e in result["estimates"].items():
        lines.append(f"  {name:<{width}}  {shown[name]:<{value_width}}  = {e['formula']}  [{', '.join(e['uses'])}]")
    return "\n".join(lines)
