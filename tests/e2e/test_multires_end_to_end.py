"""A multi-resolution schedule through the real CLI: ingest once at 128 px, train at 64 px, then go on at
128 px in the same run directory. Ingest is not redone, encode runs only the VAE (the text embeddings
come from the 64 px latents), and training continues from the last 64 px checkpoint."""

import io
import json
import tarfile

import pytest
import torch
from diffusers import UNet2DConditionModel
from run_contract import SMALL, pipeline, set_args

from pipeline.core import layout
from pipeline.core.arrays import from_npy_bytes
from pipeline.core.rundir import RunDir

# An end-to-end run of `make test-e2e`, not of `make test` (which runs tests/e2e/test_end_to_end.py only).
pytestmark = pytest.mark.e2e

PROMPTS = "sample.prompts=['a red circle on a green background', 'a blue square on a yellow background']"
COMMON = [
    *(item for item in SMALL if not item.startswith(("ingest.toy_count", "train.max_steps", "train.checkpoint_every"))),
    "ingest.toy_count=120",
    "ingest.image_size=128",
    "ingest.toy_image_size=128",
    "train.checkpoint_every=2",
    "sample.guidance_scales=[0.0, 3.0]",
    "sample.watch=false",
    PROMPTS,
]


def text_embeddings(run: RunDir) -> dict[str, bytes]:
    """Key -> text.npy bytes over every latent tar; also checks that each tar holds one latent per key."""
    found = {}
    for name in run.list(layout.ENCODE_SHARDS, ".tar"):
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}"))) as archive:
            for member in archive.getmembers():
                key, _, suffix = member.name.partition(".")
                if suffix == layout.TEXT_EMBEDDING_KEY:
                    found[key] = archive.extractfile(member).read()
    return found


def latent_side(run: RunDir) -> int:
    """The side of the latents, the same in every latent tar."""
    sides = set()
    for name in run.list(layout.ENCODE_SHARDS, ".tar"):
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}"))) as archive:
            members = [m for m in archive.getmembers() if m.name.endswith("." + layout.LATENT_KEY)]
            sides.update(from_npy_bytes(archive.extractfile(member).read()).shape[-1] for member in members)
    (side,) = sides
    return side


def adam_steps(checkpoint) -> set[int]:
    """Every `step` count in the DeepSpeed optimizer states of a checkpoint (this run's own files)."""
    found, stack = set(), [torch.load(path, weights_only=False) for path in checkpoint.glob("deepspeed/*optim_states.pt")]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            found.update(int(step) for key, step in value.items() if key == "step")
            stack.extend(v for key, v in value.items() if key != "step")
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return found


def test_training_goes_on_at_a_higher_resolution_from_the_same_checkpoint(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out)
    first = pipeline(
        "run", "--preset", "tiny", "--out", str(out), *set_args([*COMMON, "encode.resolution=64", "train.max_steps=2"])
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    before = run.read_json(layout.RUN_MANIFEST)["stages"]
    manifest_64, text_64, side_64 = run.read_json(layout.ENCODE_MANIFEST), text_embeddings(run), latent_side(run)
    tars_64 = set(run.list(layout.ENCODE_SHARDS, ".tar"))
    assert manifest_64["text_embeddings"] == {"reused": 0, "encoded": 120, "reused_from_resolution": None}

    second = pipeline(
        "run", "--preset", "tiny", "--out", str(out), *set_args([*COMMON, "encode.resolution=128", "train.max_steps=4"])
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    after = run.read_json(layout.RUN_MANIFEST)["stages"]
    assert after["ingest"]["finished"] == before["ingest"]["finished"]  # not redone

    # Encode: only the VAE ran; every text embedding is the 64 px run's, bit for bit.
    manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert manifest["resolution"] == 128 and manifest["samples"] == 120
    assert manifest["text_embeddings"] == {"reused": 120, "encoded": 0, "reused_from_resolution": 64}
    assert manifest["empty_caption_embedding"] == manifest_64["empty_caption_embedding"]
    assert latent_side(run) == 2 * side_64 and manifest["latent_shape"][-1] == 2 * manifest_64["latent_shape"][-1]
    assert text_embeddings(run) == text_64
    # One latent shard per raw shard, replaced in place (same stems), every latent at the new side.
    assert set(run.list(layout.ENCODE_SHARDS, ".tar")) == tars_64 and not run.exists(layout.ENCODE_PREVIOUS)

    # Train: resumed from the last 64 px checkpoint, steps go on, both phases recorded.
    phases = [{"resolution": 64, "start_step": 0}, {"resolution": 128, "start_step": 2}]
    assert after["train"]["phases"] == phases and after["train"]["steps"] == 4
    assert [entry["step"] for entry in run.read_json(layout.TRAIN_RESUMES)] == [2]  # loaded, at engine step 2
    state = run.read_json(f"{layout.TRAIN_CHECKPOINTS}/{layout.step_name(4)}/train_state.json")
    assert state["phases"] == phases and state["epoch"] >= 1  # the new phase's data order began a fresh epoch
    rows = [json.loads(line) for line in run.read_text(layout.TRAIN_METRICS).splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for step, side in ((2, side_64), (4, 2 * side_64)):
        unet = UNet2DConditionModel.from_pretrained(out / layout.TRAIN_EXPORT / layout.step_name(step) / layout.EXPORT_UNET)
        assert unet.config.sample_size == side
    # The optimizer state came along too: Adam has taken all 4 steps, not the 2 of phase 2 alone.
    assert adam_steps(out / layout.TRAIN_CHECKPOINTS / layout.step_name(4)) == {4}

    # Sample: each checkpoint validated at the resolution it was trained at, and says which.
    validation = run.read_json(layout.SAMPLE_VALIDATION)["checkpoints"]
    assert [(entry["step"], entry["resolution"]) for entry in validation] == [(2, 64), (4, 128)]
    assert "4 (128 px)" in run.read_text(layout.REPORT_INDEX)
    print(
        f"encode s: 64 px {before['encode']['seconds']}, 128 px reusing text {after['encode']['seconds']}; "
        f"train samples/s: 64 px {before['train']['samples_per_s']}, 128 px {after['train']['samples_per_s']}"
    )
