"""The encode stage: pure core without Ray, then the stage (decode tasks, encoder actors) on real tar shards."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from raw_shards import raw_samples, write_raw_bytes, write_raw_shard
from webdataset import TarWriter

from ingest.encode import progress as encode_progress
from ingest.encode import shard_io as encode_io
from ingest.encode import stage as encode
from pipeline.core import layout
from pipeline.core.arrays import from_base64_npy, from_npy_bytes
from pipeline.core.config import EncodeConfig, load_config
from pipeline.core.identity import Encoders
from pipeline.core.models import encode_prompts, vae_scaling_factor
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate


# -- helpers ----------------------------------------------------------------------------------
def read_latent_tars(run: RunDir) -> dict[str, dict[str, bytes]]:
    """Every sample of every latent tar, by key; a key seen twice fails the test."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in run.list(layout.ENCODE_SHARDS, suffix=".tar"):
        seen = set()
        with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{name}"))) as archive:
            for member in archive.getmembers():
                key, _, suffix = member.name.partition(".")
                assert key not in samples or key in seen, f"sample {key} written twice"
                seen.add(key)
                samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    return samples


def check_latent_shards(manifest: dict, run: RunDir | None = None) -> None:
    """manifest["latent_shards"] names each raw shard that wrote samples once, its samples (and per-bucket
    counts, if bucketed) add up to the manifest's; with `run`, its latent tars are exactly one per entry,
    `STEM.tar`, each holding the entry's samples."""
    entries = manifest["latent_shards"]
    names = [entry["name"] for entry in entries]
    assert names == sorted(set(names)) and len(names) <= manifest["raw_shards"]
    assert all(entry["samples"] > 0 and "parts" not in entry for entry in entries)
    assert sum(entry["samples"] for entry in entries) == manifest["samples"]
    if run is not None:
        assert run.list(layout.ENCODE_SHARDS, ".tar") == [f"{name}.tar" for name in names]
        for entry in entries:
            with tarfile.open(fileobj=io.BytesIO(run.read_bytes(f"{layout.ENCODE_SHARDS}/{entry['name']}.tar"))) as archive:
                keys = {member.name.partition(".")[0] for member in archive.getmembers()}
            assert len(keys) == entry["samples"]
    if "bucket_counts" in manifest:
        assert all(sum(entry["buckets"].values()) == entry["samples"] for entry in entries)
        totals = {name: sum(entry["buckets"].get(name, 0) for entry in entries) for name in manifest["bucket_counts"]}
        assert totals == manifest["bucket_counts"]
    else:
        assert all("buckets" not in entry for entry in entries)


# -- pure core --------------------------------------------------------------------------------
def test_center_crop_takes_the_middle_square():
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 90, 60))  # blue middle band
    out = encode_io.center_crop(image, 32)
    assert out.shape == (32, 32, 3)
    assert (out[:, 2:-2] == [0, 0, 255]).all()


def test_encode_batch_shapes_scaling_and_text_padding():
    config = EncodeConfig()
    encoders = Encoders.load(config)
    pixels = torch.zeros(2, 3, 64, 64)
    arrays = encode.encode_batch(pixels, ["a red circle on a blue background", ""], encoders, 2.0, config)
    assert set(arrays) == {layout.LATENT_KEY, layout.TEXT_EMBEDDING_KEY}
    latents, text = arrays[layout.LATENT_KEY], arrays[layout.TEXT_EMBEDDING_KEY]
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == np.float16
    assert text.shape == (2, 77, 64) and text.dtype == np.float16  # padded to CLIP's 77 tokens
    unscaled = encoders.vae.encode(pixels).latent_dist.mode().numpy()
    np.testing.assert_allclose(latents.astype(np.float32), 2.0 * unscaled, rtol=1e-2, atol=1e-2)
    empty = encode_prompts(encoders.tokenizer, encoders.text_encoder, [""])[0].numpy()
    np.testing.assert_allclose(text[1].astype(np.float32), empty, atol=1e-2)


def test_text_is_encoded_in_fp32_under_the_encoders_autocast_as_sampling_encodes_it():
    """encode.precision = "bf16" runs the encoders under bf16 autocast (on a GPU; here on the CPU): the
    VAE in bf16, the text encoder still in fp32, so captions, the manifest's empty caption and the
    prompts sampling encodes are the same function of the text."""
    from sample.export import Checkpoint

    config = EncodeConfig(precision="bf16")
    encoders = Encoders.load(config)
    captions = ["a red circle on a blue background", ""]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        arrays = encode.encode_batch(torch.zeros(2, 3, 64, 64), captions, encoders, 1.0, config)
    fields = dict.fromkeys(["step", "unet", "vae", "scheduler_config", "empty_embedding", "latent_shape", "scaling_factor"])
    sampling = Checkpoint(**fields, tokenizer=encoders.tokenizer, text_encoder=encoders.text_encoder)
    sampled = sampling.embed(captions).numpy().astype(np.float16)
    np.testing.assert_array_equal(arrays[layout.TEXT_EMBEDDING_KEY], sampled)
    _, manifest = encode.build_manifest(config)
    np.testing.assert_array_equal(from_base64_npy(manifest["empty_caption_embedding"]), sampled[1])


def test_long_captions_are_truncated_to_77_tokens_like_sd():
    encoders = Encoders.load(EncodeConfig())
    long = " ".join(["red"] * 200)
    tokens = encoders.tokenizer([long], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(tokens) == 77 and tokens[-1] == encoders.tokenizer.eos_token_id
    text = encode_prompts(encoders.tokenizer, encoders.text_encoder, [long, long + " blue"])
    torch.testing.assert_close(text[0], text[1])  # whatever lies past token 77 cannot matter


def test_distribution_and_flip_members():
    config = EncodeConfig(store_distribution=True, flip_copies=True)
    encoders = Encoders.load(config)
    image = np.asarray(generate(1, 64, 3)[0][1])
    pixels = encode.to_model_input(image[None])
    arrays = encode.encode_batch(pixels, ["x"], encoders, 0.5, config)
    assert (
        list(arrays)[:-1]
        == encode.latent_members(config)
        == ["latent.npy", "latent_std.npy", "latent_flip.npy", "latent_flip_std.npy"]
    )
    posterior = encoders.vae.encode(pixels).latent_dist
    np.testing.assert_allclose(arrays["latent.npy"][0].astype(np.float32), 0.5 * posterior.mean[0].numpy(), atol=2e-3)
    np.testing.assert_allclose(
        arrays["latent_std.npy"][0].astype(np.float32), 0.5 * posterior.std[0].numpy(), atol=2e-3, rtol=2e-3
    )
    assert (arrays["latent_std.npy"] > 0).all()
    mirrored = encode.to_model_input(image[:, ::-1].copy()[None])
    flipped = encoders.vae.encode(mirrored).latent_dist.mean[0].numpy() * 0.5
    np.testing.assert_allclose(arrays["latent_flip.npy"][0].astype(np.float32), flipped, atol=2e-3)
    assert not np.allclose(arrays["latent_flip.npy"], arrays["latent.npy"], atol=1e-2)


def test_decode_shard_counts_undecodable_missing_and_damaged(tmp_path):
    run = RunDir(tmp_path)
    samples = raw_samples("a", 5)
    samples[1]["jpg"] = b"not an image"
    samples[3]["jpg"] = samples[3]["jpg"][:120]  # a truncated JPEG
    del samples[4]["jpg"]
    name = write_raw_shard(run, 0, samples)
    *batches, last = encode_io.decode_shard(run, name, encode_io.DecodeOptions(resolution=32, batch_size=2))
    assert [list(batch["__key__"]) for batch in batches] == [["a0000", "a0002"]]
    assert batches[0]["pixels"].shape == (2, 32, 32, 3)
    record = last[encode_io.RECORD]  # last: the record the encoder actor writes after the shard's tar
    assert record == {
        "shard": "00000",
        "samples": 5,
        "valid": 2,
        "undecodable": 3,
        "truncated": False,
        "unreadable": False,
        "error": None,
    }

    whole = run.read_bytes(f"{layout.INGEST_SHARDS}/{name}")
    write_raw_bytes(run, 1, whole[: len(whole) * 3 // 5])  # cut inside the fourth sample
    *batches, last = encode_io.decode_shard(run, "00001.tar", encode_io.DecodeOptions(32, 8))
    kept = [key for batch in batches for key in batch["__key__"]]
    record = last[encode_io.RECORD]
    assert record["truncated"] and not record["unreadable"] and record["error"]
    assert kept and set(kept) <= {"a0000", "a0002"} and record["valid"] == len(kept)

    write_raw_bytes(run, 2, b"this is not a tar file at all" * 50)
    (last,) = encode_io.decode_shard(run, "00002.tar", encode_io.DecodeOptions(32, 8))
    record = last[encode_io.RECORD]
    assert record["unreadable"] and record["samples"] == 0 and record["valid"] == 0


def test_captions_that_are_not_utf8_are_replaced_not_fatal(tmp_path):
    run = RunDir(tmp_path)
    samples = raw_samples("b", 2)
    samples[0]["txt"] = b"caf\xe9 \xff"
    write_raw_shard(run, 0, samples)
    batch, _ = encode_io.decode_shard(run, "00000.tar", encode_io.DecodeOptions(32, 8))
    assert batch["txt"][0] == "caf\ufffd \ufffd" and len(batch["txt"]) == 2


# -- the stage -----------------------------------------------------------------------------
def test_encode_stage_on_real_shards_with_damage_then_resumes_per_shard(tmp_path, ray_local):
    from ingest.download.stage import run_stage as ingest

    config = load_config("tiny", overrides=["ingest.toy_count=150", "ingest.samples_per_shard=50", "encode.batch_size=32"])
    run = RunDir(tmp_path)
    ingest(config, run)  # real img2dataset shards 00000..00002 (50 images each)
    damaged = raw_samples("x", 6, seed=1)
    damaged[2]["jpg"] = b"\x89PNG but not really"
    write_raw_shard(run, 3, damaged)  # 5 good images, 1 undecodable
    truncated = io.BytesIO()
    with TarWriter(truncated, encoder=False) as writer:
        for sample in raw_samples("t", 4, seed=2):
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
    write_raw_bytes(run, 4, truncated.getvalue()[: len(truncated.getvalue()) // 2])
    write_raw_bytes(run, 5, b"\x00garbage" * 100)

    summary = encode.run_stage(config, run)

    manifest = run.read_json(layout.ENCODE_MANIFEST)
    samples = read_latent_tars(run)
    kept_from_truncated = sum(key.startswith("t") for key in samples)
    assert 1 <= kept_from_truncated < 4
    assert manifest["samples"] == len(samples) == 150 + 5 + kept_from_truncated == summary["counts"]["samples"]
    assert manifest["skipped_undecodable"] == 1 and "x0002" not in samples
    assert manifest["truncated_shards"] == ["00004"] and manifest["unreadable_shards"] == ["00005"]
    assert manifest["raw_shards"] == 6 and "shards" not in manifest  # counts per shard, not part names
    check_latent_shards(manifest, run)  # one latent shard per raw shard that kept samples: 00005 kept none
    assert [entry["name"] for entry in manifest["latent_shards"]] == [f"{number:05d}" for number in range(5)]
    assert [entry["samples"] for entry in manifest["latent_shards"]] == [50, 50, 50, 5, kept_from_truncated]
    assert summary["counts"]["shards"] == 5 and summary["counts"]["unreadable_shards"] == 1
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_embedding_shape"] == [77, 64]
    assert manifest["latent_storage"] == "mode" and manifest["members"] == ["latent.npy"]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(vae_scaling_factor(Encoders.load(config.encode).vae))
    assert len(manifest["vae"]["weights_sha256"]) == 64 and len(manifest["text_encoder"]["weights_sha256"]) == 64
    empty = from_base64_npy(manifest["empty_caption_embedding"])
    assert empty.shape == (77, 64) and empty.dtype == np.float16
    for sample in samples.values():
        assert from_npy_bytes(sample["latent.npy"]).shape == (4, 8, 8)
        assert from_npy_bytes(sample["text.npy"]).dtype == np.float16
        assert json.loads(sample["json"])["caption"].endswith("background")

    # An attempt that stopped after publishing shard 00001's tar, before its record; and a stray tar
    # (an older version's part). Only that shard is encoded again; the stray tar goes.
    run.remove(encode_progress.shard_record_path("00001"))
    run.write_bytes(f"{layout.ENCODE_SHARDS}/00002-deadbeef.tar", b"half a tar")
    untouched = {
        name: os.stat(tmp_path / layout.ENCODE_SHARDS / name).st_mtime_ns
        for name in run.list(layout.ENCODE_SHARDS, ".tar")
        if not name.startswith(("00001", "00002-deadbeef"))
    }

    summary = encode.run_stage(config, run)

    manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert manifest["resume"] == {"kept_shards": 5, "discarded_partial_shards": 0, "removed_orphan_tars": 2, "encoded_shards": 1}
    assert summary["counts"]["resumed_shards"] == 5
    assert {name: os.stat(tmp_path / layout.ENCODE_SHARDS / name).st_mtime_ns for name in untouched} == untouched
    assert read_latent_tars(run).keys() == samples.keys()  # every sample exactly once
    assert manifest["samples"] == len(samples)
    check_latent_shards(manifest, run)

    # Nothing left to do: no actor starts, the manifest is rebuilt from the records.
    assert encode.run_stage(config, run)["counts"]["resumed_shards"] == 6


def test_encode_stage_stores_distribution_and_flips_for_training(tmp_path, ray_local):
    from train.data import load_latent_data

    config = load_config(
        "tiny",
        overrides=[
            "encode.store_distribution=true",
            "encode.flip_copies=true",
            "encode.batch_size=16",
            "ingest.samples_per_shard=20",
        ],
    )
    run = RunDir(tmp_path)
    for number in range(2):
        write_raw_shard(run, number, raw_samples(f"s{number}", 20, seed=number))

    encode.run_stage(config, run)

    manifest = run.read_json(layout.ENCODE_MANIFEST)
    assert manifest["latent_storage"] == "distribution" and manifest["flip_copies"] is True
    assert manifest["bytes_per_sample"] == 2 * (4 * 4 * 8 * 8 + 77 * 64)
    samples = read_latent_tars(run)
    assert len(samples) == 40
    assert all(
        set(sample) == {"latent.npy", "latent_std.npy", "latent_flip.npy", "latent_flip_std.npy", "text.npy", "json"}
        for sample in samples.values()
    )
    data = load_latent_data(run)
    assert data.counts()["samples"] == 40 and data.counts()["incomplete_samples"] == 0


def test_bucketed_manifest_counts_each_raw_shards_samples_per_bucket_and_refuses_records_without():
    def shard(stem: str, written: int, buckets: dict[str, int] | None) -> encode_progress.ShardProgress:
        record = {"shard": stem, "samples": written + 1, "valid": written, "written": written, "undecodable": 1}
        record.update({"truncated": False, "unreadable": False, "error": None})
        record.update({"buckets": buckets} if buckets is not None else {})
        return encode_progress.ShardProgress(stem, record)

    state = {
        "00001": shard("00001", 4, {"96x48": 4}),
        "00000": shard("00000", 5, {"96x48": 1, "64x64": 4}),
        "00002": shard("00002", 0, {}),  # unreadable: nothing written, no latent shard
    }
    legacy = {"shard": "00003", "samples": 2, "valid": 2, "undecodable": 0, "truncated": False, "unreadable": False}
    state["00003"] = encode_progress.ShardProgress("00003", legacy)  # an older run's record: not complete
    settings = EncodeConfig(buckets=[(64, 64), (96, 48)])

    def manifest_of(state):
        return encode.encode_manifest({}, state, encode_progress.totals(state), settings, None, {})

    manifest = manifest_of(state)
    check_latent_shards(manifest)
    assert manifest["latent_shards"] == [
        {"name": "00000", "samples": 5, "buckets": {"64x64": 4, "96x48": 1}},
        {"name": "00001", "samples": 4, "buckets": {"96x48": 4}},
    ]
    assert manifest["raw_shards"] == 3 and manifest["samples"] == 9
    unbucketed = encode.encode_manifest({}, state, encode_progress.totals(state), EncodeConfig(), None, {})
    assert [entry.keys() for entry in unbucketed["latent_shards"]] == [{"name", "samples"}] * 2

    with pytest.raises(RuntimeError, match="raw shard 00001 has no per-bucket counts in encode/progress/shards/00001.json"):
        manifest_of({**state, "00001": shard("00001", 4, None)})
    bad = shard("00000", 5, {"64x64": 4})
    with pytest.raises(
        RuntimeError, match="raw shard 00000's per-bucket counts .* add up to 4 samples, but its latent tars hold 5"
    ):
        manifest_of({**state, "00000": bad})


def test_an_older_runs_parts_are_dropped_and_every_shard_encoded_again(tmp_path):
    run = RunDir(tmp_path)
    names = {"vae": {"id": "v", "subfolder": None}}
    run.write_json(encode_progress.MODELS, names)
    old = {"shard": "00000", "samples": 3, "valid": 3, "undecodable": 0, "truncated": False, "unreadable": False}
    run.write_json(encode_progress.shard_record_path("00000"), old)
    run.write_json(
        f"{encode_progress.LEGACY_PARTS}/00000-0000aaaa.json", {"shard": "00000", "part": "00000-0000aaaa", "samples": 3}
    )
    run.write_bytes(f"{layout.ENCODE_SHARDS}/00000-0000aaaa.tar", b"an old part")
    todo, found, _ = encode_progress.prepare(run, ["00000", "00001"], names)
    assert todo == ["00000", "00001"] and found["kept_shards"] == 0
    assert run.list(layout.ENCODE_SHARDS) == [] and not run.exists(encode_progress.LEGACY_PARTS)


def test_a_different_vae_discards_progress_made_with_the_old_one(tmp_path):
    run = RunDir(tmp_path)
    for number in range(2):
        write_raw_shard(run, number, raw_samples(f"s{number}", 3, seed=number))
        run.write_json(
            encode_progress.shard_record_path(f"{number:05d}"),
            {
                "shard": f"{number:05d}",
                "samples": 3,
                "valid": 0,
                "written": 0,
                "undecodable": 3,
                "truncated": False,
                "unreadable": False,
                "error": None,
            },
        )
    run.write_json(encode_progress.MODELS, {"vae": {"weights_sha256": "old"}})
    todo, found, _ = encode_progress.prepare(run, ["00000", "00001"], {"vae": {"weights_sha256": "new"}})
    assert todo == ["00000", "00001"] and found["kept_shards"] == 0
    assert run.read_json(encode_progress.MODELS) == {"vae": {"weights_sha256": "new"}}
    # With the same models, shards whose records add up are kept.
    run.write_json(
        encode_progress.shard_record_path("00000"),
        {"shard": "00000", "samples": 3, "valid": 0, "written": 0, "undecodable": 3, "truncated": False, "unreadable": False},
    )
    todo, found, _ = encode_progress.prepare(run, ["00000", "00001"], {"vae": {"weights_sha256": "new"}})
    assert todo == ["00001"] and found["kept_shards"] == 1


def test_progress_kept_by_name_is_dropped_once_the_weights_turn_out_different(tmp_path):
    run = RunDir(tmp_path)
    record = {
        "shard": "00000",
        "samples": 3,
        "valid": 0,
        "written": 0,
        "undecodable": 3,
        "truncated": False,
        "unreadable": False,
        "error": None,
    }
    run.write_json(encode_progress.shard_record_path("00000"), record)
    names = {"vae": {"id": "v", "subfolder": None}}
    run.write_json(encode_progress.MODELS, {"vae": {**names["vae"], "weights_sha256": "old"}})
    todo, found, _ = encode_progress.prepare(run, ["00000"], names)  # names agree: kept for now
    assert todo == [] and found["kept_shards"] == 1
    todo, found, _ = encode_progress.prepare(run, ["00000"], {"vae": {**names["vae"], "weights_sha256": "new"}})
    assert todo == ["00000"] and found["kept_shards"] == 0
    assert run.read_json(encode_progress.MODELS)["vae"]["weights_sha256"] == "new"


def test_a_records_content_never_names_the_file_that_discard_removes(tmp_path):
    run = RunDir(tmp_path / "run")
    outside = tmp_path / "x.tar"
    outside.write_bytes(b"not the run's")
    hostile = {"shard": "../../../x", "samples": 1, "valid": 1, "undecodable": 0, "truncated": False, "unreadable": False}
    run.write_json(encode_progress.shard_record_path("00007"), hostile)  # an old-format record: discarded
    todo, found, _ = encode_progress.prepare(run, ["00007"], {"image": {"resolution": 64}})
    assert todo == ["00007"] and found["discarded_partial_shards"] == 1
    assert outside.read_bytes() == b"not the run's" and not run.exists(encode_progress.shard_record_path("00007"))
