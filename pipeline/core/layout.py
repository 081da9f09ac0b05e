"""Names that two stages share: run-directory paths (relative to the run URL) and shard columns."""

CONFIG = "config.toml"
RUN_MANIFEST = "run.json"
LOGS = "logs"  # the driver's full log (console.log) for a local run: what the console leaves out
# The driver's lease on the run (pipeline.core.lease): who drives it, and since when its heartbeat is.
LEASE = "driver.lease"

# The cleaned URL list: one parquet per raw shard to download and index.json (written last) naming them.
INGEST_URLS = "ingest/urls"
INGEST_SHARDS = "ingest/shards"
INGEST_STATS = "ingest/stats.json"
# img2dataset writes NNNNN_stats.json after NNNNN.tar (even when writing the tar failed).
SHARD_STATS_SUFFIX = "_stats.json"
# The download task writes NNNNN_outcome.json last, once the tar holds as many samples as the stats
# file counts: a shard is complete once both exist (ingest/download/accounting.py).
SHARD_OUTCOME_SUFFIX = "_outcome.json"

ENCODE_SHARDS = "encode/shards"
ENCODE_MANIFEST = "encode/manifest.json"
# Per raw shard and per written part: what makes encode resumable shard by shard.
ENCODE_PROGRESS = "encode/progress"
# Only while a new resolution is being encoded: the previous resolution's latent tars, whose text embeddings are reused.
ENCODE_PREVIOUS = "encode/previous.json"

TRAIN_DIR = "train"
TRAIN_CHECKPOINTS = "train/checkpoints"
TRAIN_EXPORT = "train/export"
# The encoders that made the latents, saved once per run (vae/, text_encoder/, tokenizer/) and shared into each export.
TRAIN_COMPONENTS = "train/components"
# train.lora: the base UNet, saved once per run (unet/) and shared into each export's unet/.
TRAIN_LORA_BASE = "train/lora_base"
EXPORT_MODEL_INDEX = "model_index.json"
EXPORT_MODEL_CARD = "README.md"
# Inside an export: the weights sampling loads (the EMA when train.ema_decay > 0), and then also the raw ones.
EXPORT_UNET = "unet"
EXPORT_UNET_ONLINE = "unet_online"
EXPORT_SCHEDULER = "scheduler"
# Only in class-conditional exports: the conditioning mode and the class names, in label order.
EXPORT_CLASSES = "classes.json"
TRAIN_LOGS = "train/logs"
TRAIN_METRICS = "train/metrics.jsonl"
# Written when the workers stop before max_steps because training diverged: why, and at which step.
TRAIN_STOPPED = "train/stopped.json"
TRAIN_SAMPLES = "train/samples"  # train.record_samples: step-N-rank-R.jsonl, each step's sample keys up to checkpoint N
TRAIN_PROFILE = "train/profile"  # train.profile: rank-N.json, the time of each phase of a step
TRAIN_RESUMES = "train/resumes.json"  # one entry per resume: the step and checkpoint it started from

SAMPLE_VALIDATION = "sample/validation.json"
# train.trackers: each tracker's run id (MLflow, W&B) and the validations logged to them; in train/, so that a
# restarted train stage starts new tracker runs.
TRACKERS = "train/trackers.json"
SAMPLE_IMAGES = "sample/images"
REPORT_INDEX = "report/index.html"

# A directory (checkpoint, export) counts only once this marker exists inside it.
COMMIT_MARKER = "COMMITTED"

# Raw shard members (img2dataset's format) and latent shard members.
IMAGE_KEY = "jpg"
CAPTION_KEY = "txt"
META_KEY = "json"
LATENT_KEY = "latent.npy"
TEXT_EMBEDDING_KEY = "text.npy"
# Only with encode.store_distribution: the posterior's std (latent.npy then holds its mean).
LATENT_STD_KEY = "latent_std.npy"
# Only with encode.flip_copies: the same for the image mirrored left-right.
LATENT_FLIP_KEY = "latent_flip.npy"
LATENT_FLIP_STD_KEY = "latent_flip_std.npy"
# Only with encode.class_field: the sample's class index as decimal text (webdataset's .cls convention).
CLASS_KEY = "cls"

STAGES = ("ingest", "encode", "train", "sample", "report")


def superseded_name(output: str, stamp: str) -> str:
    """Where a stage's folder is moved when the stage starts over (`--force`, `--restart`): train.superseded-<UTC time>."""
    return f"{output}.superseded-{stamp}"


def step_name(step: int) -> str:
    """Checkpoint and export folder name for an optimizer step: step-0000500."""
    return f"step-{step:07d}"


def parse_step(name: str) -> int | None:
    """Inverse of step_name; None for anything else."""
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None
