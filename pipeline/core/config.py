"""The one typed config schema: sections ingest, encode, train, sample (and ray), loaded from TOML.

Presets are TOML files in `pipeline/core/presets/`; a user file or `--set section.key=value`
overrides are merged over the preset. Unknown keys and bad values fail before any work,
naming the key (pydantic's error location, e.g. `train.lr`).
"""

from __future__ import annotations

import copy
import difflib
import textwrap
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.buckets import VAE_DOWNSAMPLE, auto_buckets, check_buckets, pixel_step
from pipeline.core.credentials import embedded_credential


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnFilter(Section):
    min: float | None = Field(None, description="Keep rows with value >= min.")
    max: float | None = Field(None, description="Keep rows with value <= max.")


class IngestConfig(Section):
    source: Literal["toy", "urls"] = Field(
        "toy", description="'toy': generate the offline toy set and serve it on loopback; 'urls': read url_list."
    )
    url_list: str | None = Field(None, description="URL list as parquet, CSV or JSONL (any fsspec URL); for source='urls'.")
    url_list_format: Literal["auto", "parquet", "csv", "jsonl"] = Field(
        "auto", description="Format of url_list; 'auto' goes by its extension."
    )
    url_column: str = Field("url", description="Column of url_list holding the image URL (LAION: 'URL').")
    caption_column: str = Field("caption", description="Column of url_list holding the caption (LAION: 'TEXT').")
    extra_columns: list[str] = Field(
        default_factory=list,
        description="Columns passed through into each sample's JSON (e.g. WIDTH, HEIGHT, similarity, punsafe, pwatermark).",
    )
    filters: dict[str, ColumnFilter] = Field(
        default_factory=dict,
        description="Pre-filters on numeric columns, e.g. {punsafe = {max = 0.5}}; each counts what it drops.",
    )
    min_caption_chars: int = Field(1, ge=0, description="Rows whose caption is shorter are dropped and counted.")
    max_caption_chars: int = Field(2000, ge=1, description="Rows whose caption is longer are dropped and counted.")
    allow_loopback: bool = Field(
        False,
        description="Allow image URLs whose host resolves to loopback, for source='urls' (e.g. a local test server); "
        "source='toy' always reaches its own loopback server, and a URL list never inherits that.",
    )
    allow_private_addresses: bool = Field(
        False, description="Allow private, link-local and other non-public addresses (refused by default: SSRF)."
    )
    max_megapixels: float = Field(
        89.0, gt=0, description="Images larger than this are refused before decoding (decompression bombs)."
    )
    min_image_size: int = Field(0, ge=0, description="Images whose shorter side is smaller are dropped and counted.")
    toy_count: int = Field(3000, ge=1, description="Number of toy images to generate (source='toy').")
    toy_image_size: int = Field(64, ge=16, description="Side of the generated toy images in pixels.")
    toy_colours: list[Literal["red", "green", "blue", "yellow", "white", "black"]] | None = Field(
        None,
        min_length=2,
        description="Only these palette colours in the toy set (a shifted set to fine-tune on); unset: all six.",
    )
    toy_aspect_ratios: list[Annotated[float, Field(ge=0.25, le=4.0)]] | None = Field(
        None,
        min_length=1,
        description="Width/height ratios the toy images are drawn at, one picked at random per image (the shorter side is "
        "toy_image_size), e.g. [1.0, 1.6, 0.625, 2.0, 0.5]; unset: square only.",
    )
    image_size: int = Field(64, ge=8, description="img2dataset resizes every image to this side.")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = Field(
        "center_crop", description="img2dataset resize mode."
    )
    samples_per_shard: int = Field(500, ge=1, description="Images per webdataset shard.")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved per shard download task (one Ray task per shard).")
    threads: int = Field(16, ge=1, description="Download threads per shard task.")
    shard_retries: int = Field(2, ge=0, description="Ray retries of a shard task that failed as a whole.")
    timeout_s: float = Field(10.0, gt=0, description="Per-image download timeout in seconds.")
    retries: int = Field(0, ge=0, description="img2dataset retries per image.")
    max_response_mb: float | None = Field(
        None,
        gt=0,
        description="Largest response body read per image, in MB (10^6 bytes); a larger one is refused and counted as "
        "too_large. Unset: 32.",
    )
    request_deadline_s: float | None = Field(
        None,
        gt=0,
        description="Wall-clock limit of one image request, every redirect and read included (timeout_s bounds each "
        "wait on the socket, not the whole); a slower one is cut off and counted as timeout. Unset: 60.",
    )

    @field_validator("url_list")
    @classmethod
    def _url_list_holds_no_credentials(cls, value: str | None) -> str | None:
        # The value lands in the run's config.toml, logs and report: a secret in it would too.
        if value and (found := embedded_credential(value)):
            raise ValueError(
                f"ingest.url_list embeds a credential ({found}); it would be written to the run's config.toml, logs "
                "and report. Remove it from the URL and give credentials by environment instead: for s3:// the "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables (or an instance role), for gs:// "
                "GOOGLE_APPLICATION_CREDENTIALS, for https:// fsspec's environment config, e.g. "
                'FSSPEC_HTTPS=\'{"client_kwargs": {"trust_env": true}}\' with the password in ~/.netrc; or copy '
                "the list into the run's object store"
            )
        return value


class EncodeConfig(Section):
    vae: str = Field("builtin:tiny-vae", description="AutoencoderKL: Hugging Face id, local path or builtin:NAME.")
    vae_subfolder: str | None = Field(None, description="Subfolder of `vae` holding the model (e.g. 'vae' in an SD repo).")
    text_encoder: str = Field(
        "builtin:tiny-text-encoder", description="CLIPTextModel: Hugging Face id, local path or builtin:NAME."
    )
    text_encoder_subfolder: str | None = Field(None, description="Subfolder of `text_encoder` holding the model.")
    tokenizer: str = Field("builtin:clip-tokenizer", description="CLIPTokenizer: Hugging Face id, local path or builtin:NAME.")
    tokenizer_subfolder: str | None = Field(None, description="Subfolder of `tokenizer` holding the tokenizer.")
    resolution: int = Field(
        64, ge=8, description="Images are resized (shorter side) and centre-cropped to this side before the VAE."
    )
    batch_size: int = Field(64, ge=1, description="Images per encoder forward pass.")
    num_actors: int = Field(1, ge=1, description="Encoder actors, each holding the VAE and text encoder once.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs reserved per encoder actor (fractional on small machines).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per encoder actor; 0 runs on CPU.")
    cpus_per_decode_task: float = Field(
        1.0, gt=0, description="CPUs reserved per task that reads and decodes one raw shard (decoding is single-threaded)."
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Autocast precision for the encoders (GPU only).")
    store_distribution: bool = Field(
        False,
        description="Store the VAE posterior's mean and std instead of its mode; training then draws a fresh latent each time it sees an image.",
    )
    flip_copies: bool = Field(
        False, description="Also encode every image mirrored left-right; training picks one of the two at random (p=0.5)."
    )
    buckets: list[tuple[int, int]] | Literal["auto"] | None = Field(
        None,
        description="Aspect-ratio buckets as [[width, height], ...] in pixels: each image is resized to cover the bucket nearest "
        "its aspect ratio and centre-cropped to it, and training batches one bucket at a time. 'auto': sides multiples of "
        "8 x 2^(UNet down blocks - 1) px, pixel counts within 15% of resolution^2, ratios up to 2:1 (resolved when the config "
        "loads). Needs ingest.resize_mode 'keep_ratio' or 'no'. Unset: square `resolution`, centre crop.",
    )

    @field_validator("buckets")
    @classmethod
    def _buckets_well_formed(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one [width, height] bucket, or leave it unset")
            check_buckets([tuple(bucket) for bucket in value], VAE_DOWNSAMPLE)
        return value

    class_field: str | None = Field(
        None,
        description="Field of each sample's metadata JSON holding its class (e.g. 'shape' on toy runs; a URL list's column "
        "passed through by ingest.extra_columns); each latent sample then carries its class index. Unset: no class labels.",
    )
    classes: list[str] | None = Field(
        None,
        min_length=1,
        description="Class names in label order (index i is classes[i]); samples whose class_field value is not listed are "
        "skipped and counted. Unset: the distinct values found in the raw shards, sorted (numbers numerically).",
    )

    @model_validator(mode="after")
    def _classes_need_field(self) -> EncodeConfig:
        if self.classes is not None and not self.class_field:
            raise ValueError("classes is set but class_field is not")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes has duplicates: {self.classes}")
        return self


_MISSING = object()

# DeepSpeed keys (dotted paths) that train.deepspeed may not set, and what they come from: a
# second source of the same setting would leave the two disagreeing (the loop reads zero_stage
# and the batch size itself, and DeepSpeed ignores an optimizer or scheduler section when the
# pipeline passes its own AdamW and schedule).
DEEPSPEED_OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size_per_worker",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "train_batch_size": "train.batch_size_per_worker x train.gradient_accumulation x train.num_workers",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "train.lr and train.weight_decay (AdamW)",
    "scheduler": "train.warmup_steps and train.lr_schedule",
}


class LoraSettings(Section):
    """LoRA adapters on the UNet (peft, as diffusers' train_text_to_image_lora.py adds them); the base is train.init_from."""

    rank: int = Field(4, ge=1, description="Rank of each adapter's two factors (diffusers' LoRA example: 4).")
    alpha: float | None = Field(
        None, gt=0, description="Scale numerator: an adapter adds (alpha / rank) * B @ A to its layer; unset: rank (scale 1)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each adapter's input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        min_length=1,
        description="Layers that get an adapter, by name or name suffix as peft matches them (default: every attention "
        "projection, as diffusers' LoRA example).",
    )

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


class TrainConfig(Section):
    unet: Literal["tiny", "micro", "sd15"] = Field("tiny", description="UNet2DConditionModel preset.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers, each running one DeepSpeed engine.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker.")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker (CPU training).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts each worker on its own node.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Training precision.")
    batch_size_per_worker: int = Field(32, ge=1, description="Micro-batch per worker.")
    shuffle_window_shards: int = Field(
        4,
        ge=1,
        description="Latent shards whose samples are shuffled together (train.order): a batch mixes them, and a worker holds "
        "about twice this many shards per data stream in memory.",
    )
    record_samples: bool = Field(
        False,
        description="Write every rank's sample keys, step by step, to RUN/train/samples/step-N-rank-R.jsonl with each "
        "checkpoint N: an audit of the data order (large at scale).",
    )
    profile: bool = Field(
        False,
        description="Time each phase of every step on every rank (batch reading, forward, backward, gradient reduce, "
        "optimizer, moving average, logging, export, checkpoint): RUN/train/profile/rank-N.json, and rank 0 logs the "
        "table at the end. Costs a few timer reads per step.",
    )
    data_streams: int | None = Field(
        None,
        ge=1,
        description="Streams the data order deals shards to, fixed for a run; unset: the first attempt's num_workers. A "
        "resume may use any worker count whose num_workers x batch_size_per_worker is a multiple of it.",
    )
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="Schedule after warmup.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip; 0 disables.")
    caption_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Probability of replacing a caption embedding with the empty caption's (and the class label with the "
        "null class, in the same draw, where conditioning includes 'class').",
    )
    conditioning: Literal["text", "class", "text+class"] = Field(
        "text",
        description="What the UNet is conditioned on: caption embeddings; class labels (encode.class_field) through a "
        "learned class embedding with one extra null class for guidance, the text input then being the empty caption's; or both.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction",
        description="What the UNet predicts. v-prediction stays well-posed where the schedule leaves almost no signal "
        "(the cosine schedule's last steps); epsilon with that schedule and trailing spacing is refused.",
    )
    noise_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = Field(
        "squaredcos_cap_v2", description="DDPM beta schedule."
    )
    num_train_timesteps: int = Field(1000, ge=1, description="Diffusion timesteps.")
    rescale_betas_zero_snr: bool = Field(
        False,
        description="Rescale the betas so the last timestep holds no signal (zero terminal SNR, Lin et al. 2023; "
        "diffusers' rescale_betas_zero_snr), so that trailing spacing samples from pure noise with any schedule "
        "(SD's scaled_linear keeps sqrt(alpha_bar) ~ 0.07 of the image at t = 999). Exported in the scheduler config, "
        "so samplers inherit it. Needs prediction_type = 'v_prediction'.",
    )
    beta_start: float | None = Field(
        None,
        gt=0,
        description="First beta of the 'linear'/'scaled_linear' schedules; unset: diffusers' 0.0001 (SD-1.5: 0.00085).",
    )
    beta_end: float | None = Field(
        None, gt=0, description="Last beta of the 'linear'/'scaled_linear' schedules; unset: diffusers' 0.02 (SD-1.5: 0.012)."
    )
    init_from: str | None = Field(
        None,
        description="Fine-tune: start from this diffusers-format UNet (safetensors) instead of a fresh `unet` preset: a local "
        "folder (a run's export folder RUN/train/export/step-N uses its unet/) or a Hugging Face id.",
    )
    init_subfolder: str | None = Field(
        None, description="Subfolder of init_from holding the UNet (e.g. 'unet' in a Stable Diffusion repo)."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameters left untrained, by name as in named_parameters(): a dotted prefix ('down_blocks', 'mid_block', "
        "'up_blocks.1', 'conv_in', 'time_embedding') or a glob ('*.attn2.*': cross-attention); each must match some parameter.",
    )
    lora: LoraSettings | None = Field(
        None,
        description="Train LoRA adapters on the init_from UNet instead of its weights, e.g. {rank = 8}; the optimizer, ZeRO, "
        "the EMA and checkpoints then hold the adapters only, and exports hold pytorch_lora_weights.safetensors "
        "(StableDiffusionPipeline.load_lora_weights reads it) next to the base unet/.",
    )
    lora_fuse_export: bool = Field(
        False, description="With train.lora: each export's unet/ holds the base with the adapter fused in, not the base alone."
    )
    checkpoint_every: int = Field(
        500, ge=1, description="Save (and export) a checkpoint every N steps; the last step always saves."
    )
    keep_checkpoints: int = Field(3, ge=1, description="Resumable checkpoints kept (exports are all kept).")
    log_every: int = Field(10, ge=1, description="Log loss and learning rate every N steps.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics go besides train/metrics.jsonl: TensorBoard files (train/logs), MLflow, W&B. Every logged "
        "step and each validation (figures per guidance scale, grids) go to each, the config to MLflow and W&B; their URI, "
        "keys and mode come from the environment (MLFLOW_TRACKING_URI, WANDB_API_KEY, WANDB_MODE), never from here.",
    )
    tracker_project: str = Field(
        "t2i-pipeline", min_length=1, description="MLflow experiment and W&B project (MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT win)."
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; unset: plain MSE. With v-prediction "
        "on the cosine schedule it weighs t >= 900 at most 0.025 (docs/training.md).",
    )
    noise_offset: float = Field(
        0.0, ge=0, description="Offset noise (Guttenberg): adds this times one Gaussian per sample and channel; e.g. 0.05."
    )
    ema_decay: float = Field(
        0.9999,
        ge=0,
        lt=1,
        description="Decay of an exponential moving average of the UNet weights, capped early on by the warmup "
        "(1 + n) / (10 + n) after n updates; exports then hold it in unet/ (what sampling loads) and the raw weights "
        "in unet_online/. 0 disables it: unet/ holds the raw weights.",
    )
    max_nonfinite_streak: int = Field(
        20, ge=1, description="Stop with an error after this many non-finite losses in a row (isolated ones are skipped)."
    )
    max_failures: int = Field(
        0, ge=-1, description="Ray Train restarts of the workers after a failure, each from the latest checkpoint; -1: no limit."
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged (deeply) over the generated DeepSpeed config, e.g. {zero_optimization = {overlap_comm = true}}; "
        "keys the pipeline sets from other train keys are refused.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_leaves_owned_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for path, owner in DEEPSPEED_OWNED_KEYS.items():
            node: Any = value
            for part in path.split("."):
                if not isinstance(node, dict):
                    break  # e.g. `bf16 = true`: a value where the pipeline writes a table replaces its setting too
                node = node.get(part, _MISSING)
            if node is not _MISSING:
                raise ValueError(f"train.deepspeed.{path} is set by the pipeline from {owner}; set that instead")
        return value

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if self.init_subfolder and not self.init_from:
            raise ValueError("init_subfolder is set but init_from is not")
        if self.lora is not None and not self.init_from:
            raise ValueError("lora is set but init_from is not: the adapters train on a base UNet, set train.init_from")
        if self.lora is not None and self.freeze:
            raise ValueError(
                "lora and freeze are both set: with LoRA the base is frozen whole and only the adapters train; "
                "choose their layers with train.lora.target_modules"
            )
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"trackers = {self.trackers} names a tracker twice")
        if self.lora_fuse_export and self.lora is None:
            raise ValueError("lora_fuse_export is set but lora is not")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "rescale_betas_zero_snr needs prediction_type = 'v_prediction': at zero terminal SNR the noise "
                f"is all there is at the last timestep, so predicting it ({self.prediction_type!r}) says nothing of the image"
            )
        return self


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Validation prompts.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="One image per prompt and seed.")
    guidance_scales: list[float] = Field(
        default_factory=lambda: [0.0, 1.0, 3.0, 7.5], description="Classifier-free guidance scales to validate."
    )
    scheduler: Literal["ddpm", "ddim", "dpmsolver++", "euler"] = Field("dpmsolver++", description="Sampling scheduler.")
    steps: int = Field(20, ge=1, description="Denoising steps.")
    guidance_rescale: float = Field(
        0.7,
        ge=0,
        le=1,
        description="Guidance rescale phi (Lin et al. 2023, diffusers' guidance_rescale): the guided prediction is rescaled "
        "to the conditional one's standard deviation and mixed in by phi, at guidance scales other than 0 and 1; 0 is plain "
        "guidance. Without it, deterministic samplers fall short of 1000-step DDPM at guidance 7.5 at any step count on the "
        "tiny preset's v-prediction model; sd15-256 (epsilon, as SD-1.5) keeps 0.",
    )
    timestep_spacing: Literal["trailing", "leading", "linspace"] = Field(
        "trailing", description="How sampling steps are spread over the training timesteps; 'trailing' starts from pure noise."
    )
    batch_size: int = Field(64, ge=1, description="Images per UNet batch.")
    class_labels: list[str] | None = Field(
        None,
        min_length=1,
        description="Class names to validate when train.conditioning includes 'class' (with 'text+class': every prompt with "
        "every class); unset: every class of the encode manifest.",
    )
    judge: Literal["toy", "none"] = Field(
        "none",
        description="'toy': exact prompt accuracy with the toy pixel judge, and shape accuracy (the drawn shape is the "
        "prompt's, or the class's when the classes are toy shapes).",
    )
    clip_model: str | None = Field(
        None,
        description="CLIPModel (Hugging Face id, local path or builtin:NAME) for the CLIP score; unset: encode.text_encoder "
        "when it is a whole CLIPModel (with an image tower), else the metric is skipped with a note.",
    )
    fid_inception: str | None = Field(
        None,
        description="Path of pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth, or the same state dict as "
        ".safetensors) for FID; unset or missing: FID is skipped with a note.",
    )
    fid_reference: str | None = Field(
        None,
        description="Held-out images for FID: a folder of image files or a .tar of them (any fsspec URL); unset with "
        "ingest.source = 'toy': toy images drawn with another seed than the training set's.",
    )
    fid_reference_count: int = Field(
        500, ge=2, description="Reference images FID uses at most (their statistics are cached in sample/)."
    )
    watch: bool = Field(
        True,
        description="Validate exports while `pipeline run` trains (the newest unvalidated one per poll); the stage does the rest.",
    )
    watch_interval_s: float = Field(30.0, gt=0, description="Seconds between the watcher's looks at train/export/.")
    watch_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs Ray reserves for each watcher task; 0 reserves none, so it runs even while training holds every CPU "
        "(as on the 2-core demo), sharing them.",
    )
    watch_gpus: float = Field(0.0, ge=0, description="GPUs per watcher task; 0 samples on CPU.")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster to join; unset starts a local instance (or uses RAY_ADDRESS).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local instance; unset lets Ray count them.")
    check_resources: bool = Field(
        True,
        description="Before a stage starts, refuse a request the cluster can never grant (its totals, or an autoscaler's "
        "reported maximum) instead of waiting for it; false where an autoscaler Ray does not know of adds nodes.",
    )


class PipelineConfig(Section):
    seed: int = Field(0, description="Base seed for toy data, shuffles, dropout and noise.")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _sources_consistent(self) -> PipelineConfig:
        if self.ingest.source == "urls" and not self.ingest.url_list:
            raise ValueError("ingest.url_list is required when ingest.source = 'urls'")
        if self.sample.judge == "toy" and self.ingest.source != "toy":
            raise ValueError("sample.judge = 'toy' needs ingest.source = 'toy'")
        if "class" in self.train.conditioning and not self.encode.class_field:
            raise ValueError(
                f"train.conditioning = {self.train.conditioning!r} needs encode.class_field (where class labels come from)"
            )
        if self.sample.class_labels and "class" not in self.train.conditioning:
            raise ValueError("sample.class_labels is set but train.conditioning has no 'class'")
        unknown = [name for name in self.sample.class_labels or [] if self.encode.classes and name not in self.encode.classes]
        if unknown:
            raise ValueError(f"sample.class_labels {unknown} are not in encode.classes {self.encode.classes}")
        if self.encode.buckets is not None:
            self._resolve_buckets()
        self._well_posed_schedule()
        return self

    def _well_posed_schedule(self) -> None:
        """Epsilon-prediction on the cosine schedule, sampled from t = 999 (trailing spacing), divides the
        noise estimate's error by sqrt(alpha_bar) ~ 5e-5 at the first step (Lin et al. 2023): refused."""
        train, sample = self.train, self.sample
        if (train.prediction_type, train.noise_schedule, sample.timestep_spacing) == ("epsilon", "squaredcos_cap_v2", "trailing"):
            raise ValueError(
                "train.prediction_type = 'epsilon' with train.noise_schedule = 'squaredcos_cap_v2' and "
                "sample.timestep_spacing = 'trailing' is ill-posed: sampling starts at t = 999, where this schedule "
                "keeps sqrt(alpha_bar) ~ 5e-5 of the image, so every error of the predicted noise is amplified ~20,000x. "
                "Use train.prediction_type = 'v_prediction' (the default), or another noise_schedule or timestep_spacing"
            )

    def _resolve_buckets(self) -> None:
        if self.ingest.resize_mode in ("center_crop", "border"):
            raise ValueError(
                f"encode.buckets needs images that keep their aspect ratio, but ingest.resize_mode = "
                f"{self.ingest.resize_mode!r} makes them square: set ingest.resize_mode = 'keep_ratio' (or 'no')"
            )
        # An init_from UNet's depth is not known here: take the strictest preset's step.
        step = pixel_step("sd15" if self.train.init_from else self.train.unet)
        if self.encode.buckets == "auto":
            found = auto_buckets(self.encode.resolution, step)
            if not found:
                raise ValueError(f"encode.buckets = 'auto' finds no bucket of {step}-px sides near encode.resolution")
            self.encode.buckets = found
        else:
            check_buckets(list(self.encode.buckets), step)

    @model_validator(mode="after")
    def _images_big_enough(self) -> PipelineConfig:
        """Encode would upscale images smaller than encode.resolution: blurred latents, silently. A multi-resolution
        schedule ingests once at its largest resolution and encodes at each (docs/training.md: multi-resolution)."""
        sides = []
        if self.ingest.resize_mode != "no":  # with "no", img2dataset keeps each image's own size: unknown here
            sides.append(("ingest.image_size", self.ingest.image_size))
        if self.ingest.source == "toy":
            sides.append(("ingest.toy_image_size", self.ingest.toy_image_size))
        for key, side in sides:
            if side < self.encode.resolution:
                raise ValueError(
                    f"encode.resolution ({self.encode.resolution}) is larger than {key} ({side}): encode would upscale "
                    f"every image. Ingest at least at the largest resolution you will encode ({key} = "
                    f"{self.encode.resolution}; changing it ingests again), or lower encode.resolution"
                )
        return self


PRESETS = ("tiny", "sd15-256")
# Short names every command accepts for a preset too (`pipeline plan --preset sd15`).
PRESET_ALIASES = {"sd15": "sd15-256"}


def preset_name(name: str) -> str:
    """A preset's name, its alias resolved; ConfigError naming the choices if there is no such preset."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        aliases = ", ".join(f"{alias} for {target}" for alias, target in PRESET_ALIASES.items())
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (or {aliases})")
    return name


def preset_data(name: str) -> dict[str, Any]:
    text = resources.files("pipeline.core.presets").joinpath(f"{preset_name(name)}.toml").read_text()
    return tomllib.loads(text)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over a copy of `base`; nested dicts merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> dict[str, Any]:
    """'train.lr=1e-4' -> {'train': {'lr': 1e-4}}; the value is parsed as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _list_hint(item: str) -> tuple[str, str] | None:
    """(key, hint) for an override whose value is a bare comma-separated list ('sample.seeds=0,1'), not TOML,
    so kept as one string: the same list in brackets, its words quoted where they must be."""
    key, raw = (part.strip() for part in item.split("=", 1))
    if "," not in raw or raw.startswith(("[", "{", '"', "'")):
        return None
    try:
        tomllib.loads(f"v = [{raw}]")
        listed = f"[{raw}]"
    except tomllib.TOMLDecodeError:
        listed = "[" + ", ".join(_toml_value(word.strip()) for word in raw.split(",")) + "]"
    return key, f"did you mean --set {key}={listed}?"


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed where `loc` (a pydantic error location) points: its section's fields, or the sections."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _problem_line(problem: dict, hints: dict[str, str]) -> str:
    """'key: what is wrong', with a hint where one helps: the key meant by a misspelt one, a list's brackets."""
    loc = problem["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    line = f"{key}: {problem['msg']}"
    if problem["type"] == "extra_forbidden" and loc:
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
        if close:
            line += f"; did you mean {'.'.join(str(part) for part in (*loc[:-1], close[0]))}?"
    hint = next((text for prefix, text in hints.items() if key == prefix or key.startswith(prefix + ".")), None)
    return line + (f"; {hint}" if hint else "")


def validate(data: dict[str, Any], hints: dict[str, str] | None = None) -> PipelineConfig:
    """The config, or ConfigError with one line per problem; `hints` (key -> text) are added to a problem of that key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        lines = [_problem_line(problem, hints or {}) for problem in error.errors()]
        if len(lines) == 1:
            raise ConfigError(f"invalid config: {lines[0]}") from None
        raise ConfigError("invalid config:\n" + "\n".join(f"  {line}" for line in lines)) from None


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Preset (default 'tiny' when no file is given), then the TOML file, then overrides."""
    data: dict[str, Any] = preset_data(preset or "tiny") if preset or not path else {}
    if path:
        try:
            data = deep_merge(data, tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
        except (OSError, UnicodeDecodeError) as error:  # missing, a folder, unreadable
            raise ConfigError(f"--config {path}: {getattr(error, 'strerror', None) or error}") from None
    hints = {}
    for item in overrides:
        data = deep_merge(data, _parse_override(item))
        hint = _list_hint(item)
        if hint:
            hints[hint[0]] = hint[1]
    return validate(data, hints)


def to_toml(config: PipelineConfig, explain: bool = False) -> str:
    """Every value written out, so a run directory's config.toml is complete on its own; with `explain`,
    each key's description (its Field's) as a comment above it."""
    data = config.model_dump(mode="json")
    lines = [*_described(PipelineConfig, "seed", explain), f"seed = {_toml_value(data.pop('seed'))}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        model = type(getattr(config, section))
        for key, value in values.items():
            lines.extend(_described(model, key, explain))
            if value is None:
                lines.append(f"# {key} is unset")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _described(model: type[BaseModel], key: str, explain: bool) -> list[str]:
    description = model.model_fields[key].description if explain else None
    return [f"# {line}" for line in textwrap.wrap(description, 100)] if description else []


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(key)} = {_toml_value(item)}" for key, item in value.items() if item is not None)
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
