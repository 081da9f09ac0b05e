"""Reusing the text embeddings of a run's previous resolution (ingest.encode.reuse): the record's lifecycle on
real files, the decode tasks attaching embeddings by key, and the actors encoding only what is missing."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from synthetic_latents import sample_members, shard_bytes
from webdataset import TarWriter

from ingest.encode import progress as encode_progress
from ingest.encode import reuse
from ingest.encode import shard_io as encode_io
from pipeline.core import layout
from pipeline.core.arrays import to_base64_npy
from pipeline.core.rundir import RunDir

TEXT_SHAPE = [4, 8]
IDENTITY = {
    "text_encoder": {"id": "te", "subfolder": None, "weights_sha256": "aa"},
    "tokenizer": {"id": "tok", "subfolder": None, "vocab_sha256": "bb"},
}


def text(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(TEXT_SHAPE).astype(np.float16)


def encoded_at_64(run: RunDir) -> None:
    """What a finished 64 px encode leaves: one raw shard's latent shard, its progress record, the manifest."""
    members = [m for i in range(3) for m in sample_members(f"k{i}", np.zeros((4, 8, 8), np.float16), text(i), f"c{i}")]
    run.write_bytes(encode_progress.latent_tar_path("00000"), shard_bytes(members))
    run.write_json(encode_progress.shard_record_path("00000"), {"shard": "00000", "samples": 3, "valid": 3, "written": 3})
    run.write_json(
        layout.ENCODE_MANIFEST,
        {"resolution": 64, **IDENTITY, "text_embedding_shape": TEXT_SHAPE, "empty_caption_embedding": to_base64_npy(text(99))},
    )


def test_previous_latents_are_recorded_first_kept_while_encoding_and_removed_last(tmp_path):
    run = RunDir(tmp_path)
    encoded_at_64(run)
    assert reuse.stash(run, 64) is None  # the same resolution: nothing to reuse
    previous = reuse.stash(run, 128)
    assert previous["resolution"] == 64 and previous["text_embedding_shape"] == TEXT_SHAPE and "parts" not in previous
    assert run.read_json(layout.ENCODE_PREVIOUS) == previous
    assert not run.exists(layout.ENCODE_MANIFEST) and not run.exists(layout.ENCODE_PROGRESS)
    assert reuse.stash(run, 128) == previous  # a crash from here on resumes from the record

    # Tars without a record are the previous latents while reusing: kept, even when other models drop the progress.
    run.write_bytes(encode_progress.latent_tar_path("00001"), b"a 64 px tar of a raw shard that is gone now")
    todo, _, _ = encode_progress.prepare(run, ["00000"], {"image": {"resolution": 128}}, reusing=True)
    assert todo == ["00000"] and run.list(layout.ENCODE_SHARDS, ".tar") == ["00000.tar", "00001.tar"]
    encode_progress.prepare(run, ["00000"], {"image": {"resolution": 256}}, reusing=True)
    assert run.list(layout.ENCODE_SHARDS, ".tar") == ["00000.tar", "00001.tar"]

    # Once the new resolution is complete (00000's tar replaced), what no raw shard has goes, then the record.
    assert reuse.finish(run, previous, complete={"00000"}) == 1
    assert run.list(layout.ENCODE_SHARDS, ".tar") == ["00000.tar"] and not run.exists(layout.ENCODE_PREVIOUS)


def test_reuse_needs_the_same_text_encoder_and_tokenizer():
    previous = {**IDENTITY}
    assert reuse.same_text_encoder(previous, {kind: {"id": r["id"], "subfolder": None} for kind, r in IDENTITY.items()})
    assert reuse.same_text_encoder(previous, IDENTITY)
    other = {**IDENTITY, "text_encoder": {**IDENTITY["text_encoder"], "weights_sha256": "cc"}}
    assert not reuse.same_text_encoder(previous, other)
    assert not reuse.same_text_encoder(previous, {**IDENTITY, "tokenizer": {**IDENTITY["tokenizer"], "id": "other"}})


def test_decode_tasks_attach_each_samples_previous_embedding_by_key(tmp_path):
    run = RunDir(tmp_path)
    encoded_at_64(run)
    previous = reuse.stash(run, 32)
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for key in ("k2", "k0", "new"):  # another order than the latents', and one sample they lack
            image = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(image, format="JPEG")
            writer.write({"__key__": key, "jpg": image.getvalue(), "txt": f"caption {key}".encode(), "json": b"{}"})
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.tar", buffer.getvalue())

    options = encode_io.DecodeOptions(resolution=32, batch_size=8, previous=previous)
    batch, last = encode_io.decode_shard(run, "00000.tar", options)  # reads encode/shards/00000.tar, its own only
    assert batch[reuse.REUSED].tolist() == [True, True, False]
    embeddings = batch[layout.TEXT_EMBEDDING_KEY]
    assert np.array_equal(embeddings[0], text(2)) and np.array_equal(embeddings[1], text(0)) and not embeddings[2].any()
    assert last[encode_io.RECORD]["text_reused"] == 2


def test_actors_run_the_text_encoder_on_the_rows_without_an_embedding_only():
    calls = []

    def encode(captions):
        calls.append(captions)
        return {layout.TEXT_EMBEDDING_KEY: np.full((len(captions), *TEXT_SHAPE), 7, np.float16)}

    batch = {reuse.REUSED: np.array([True, False, True]), layout.TEXT_EMBEDDING_KEY: np.stack([text(0), text(1) * 0, text(2)])}
    merged = reuse.complete_text(batch, ["a", "b", "c"], encode)[layout.TEXT_EMBEDDING_KEY]
    assert calls == [["b"]]
    assert np.array_equal(merged[0], text(0)) and (merged[1] == 7).all() and np.array_equal(merged[2], text(2))
    batch[reuse.REUSED][:] = True
    reuse.complete_text(batch, ["a", "b", "c"], encode)
    assert calls == [["b"]]  # all reused: the text encoder does not run
    assert reuse.complete_text({}, ["a", "b"], encode)[layout.TEXT_EMBEDDING_KEY].shape == (2, *TEXT_SHAPE)
    assert calls[-1] == ["a", "b"]  # nothing to reuse: every caption is encoded
