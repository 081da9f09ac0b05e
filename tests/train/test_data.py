"""Reading latent shards and assembling batches (train.data); the order is in test_order.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from synthetic_latents import LATENT_SHAPE, TEXT_SHAPE, sample_members, shard_bytes, write_encode_output, write_latent_run

from pipeline.core import layout
from pipeline.core.config import EncodeConfig
from train.data import load_latent_data, read_latent_shard

BOTH_OPTIONS = EncodeConfig(store_distribution=True, flip_copies=True)


def test_load_latent_data_reads_shards_and_manifest(latent_run):
    data = load_latent_data(latent_run)
    assert data.shard_sizes == (32, 32, 32, 32)
    assert data.spec.latent_shape == LATENT_SHAPE and data.spec.text_embedding_shape == TEXT_SHAPE
    assert data.spec.cross_attention_dim == 64 and data.spec.sample_size == 8
    assert data.spec.empty_caption_embedding.shape == TEXT_SHAPE
    assert not data.spec.flip_copies and not data.spec.stores_distribution
    batch = data.batch([(0, 0), (3, 31)])
    assert batch["latents"].shape == (2, *LATENT_SHAPE)
    assert batch["text_embeddings"].shape == (2, *TEXT_SHAPE)
    stored = [
        data.shards[0].by_bucket[""].latents[layout.LATENT_KEY][0],
        data.shards[3].by_bucket[""].latents[layout.LATENT_KEY][31],
    ]
    assert batch["latents"].dtype == torch.float16  # cast on the device, not on the host
    assert torch.equal(batch["latents"], torch.from_numpy(np.stack(stored)))  # nothing drawn
    assert data.counts()["incomplete_samples"] == 0


def test_only_the_manifests_shards_are_read_and_a_manifest_without_counts_is_refused(latent_run):
    latent_run.write_bytes(f"{layout.ENCODE_SHARDS}/zz-leftover.tar", b"not a tar")
    assert load_latent_data(latent_run).counts()["truncated_shards"] == 0  # not listed: not read

    manifest = latent_run.read_json(layout.ENCODE_MANIFEST)
    del manifest["latent_shards"]
    latent_run.write_json(layout.ENCODE_MANIFEST, manifest)
    with pytest.raises(ValueError, match="latent_shards.*run the encode stage again"):
        load_latent_data(latent_run)


def test_a_counted_sample_unreadable_now_is_replaced_by_another_of_its_shard(latent_run):
    """Every rank must still take a full batch: the missing row reads another sample, and is counted."""
    good = load_latent_data(latent_run)
    manifest = latent_run.read_json(layout.ENCODE_MANIFEST)
    manifest["latent_shards"][1]["samples"] += 2  # encode counted two more than the tar holds now
    latent_run.write_json(layout.ENCODE_MANIFEST, manifest)
    data = load_latent_data(latent_run)
    assert data.counts()["replaced_samples"] == 2 and data.shard_sizes[1] == 34
    replaced = data.batch([(1, 32), (1, 33)])["latents"]
    assert torch.equal(replaced, good.batch([(1, 0), (1, 1)])["latents"])


def test_members_that_contradict_the_flags_are_refused(latent_run):
    manifest = latent_run.read_json(layout.ENCODE_MANIFEST)
    manifest["members"] = [layout.LATENT_KEY, layout.LATENT_FLIP_KEY]
    latent_run.write_json(layout.ENCODE_MANIFEST, manifest)
    with pytest.raises(ValueError, match="flip_copies False"):
        load_latent_data(latent_run)


def test_augmented_batch_is_a_pure_function_of_samples_and_generator(tmp_path):
    data = load_latent_data(write_latent_run(tmp_path / "run", encode=BOTH_OPTIONS))
    assert data.spec.flip_copies and data.spec.stores_distribution
    assert all(latents.dtype == np.float16 for shard in data.shards for latents in shard.by_bucket[""].latents.values())
    samples = [(shard, index) for shard in range(4) for index in range(0, 32, 4)]

    def batch(seed):
        return data.batch(samples, torch.Generator().manual_seed(seed))

    first, again, other = batch(1), batch(1), batch(2)
    assert torch.equal(first["latents"], again["latents"]) and torch.equal(first["text_embeddings"], again["text_embeddings"])
    assert not torch.equal(first["latents"], other["latents"])
    assert torch.equal(first["text_embeddings"], other["text_embeddings"])


def test_flip_copies_alone_pick_the_stored_or_the_mirrored_latent(tmp_path):
    data = load_latent_data(write_latent_run(tmp_path / "run", encode=EncodeConfig(flip_copies=True)))
    samples = [(shard, index) for shard in range(4) for index in range(32)]
    latents = data.batch(samples, torch.Generator().manual_seed(0))["latents"]
    flipped = []
    for row, (shard, index) in zip(latents, samples):
        stored = {
            name: torch.from_numpy(data.shards[shard].by_bucket[""].latents[name][index].astype(np.float32))
            for name in data.spec.latent_members
        }
        assert torch.equal(row, stored[layout.LATENT_KEY]) or torch.equal(row, stored[layout.LATENT_FLIP_KEY])
        flipped.append(not torch.equal(row, stored[layout.LATENT_KEY]))
    assert 0 < sum(flipped) < len(samples)


def constant_latent_run(root, shards: int = 2, per_shard: int = 200):
    """Every sample's latent is mean 2, std 0.5; its mirrored copy's is mean -2, std 0.25."""

    def full(value):
        return np.full(LATENT_SHAPE, value, np.float16)

    text = np.zeros(TEXT_SHAPE, np.float16)
    extra = {layout.LATENT_STD_KEY: full(0.5), layout.LATENT_FLIP_KEY: full(-2), layout.LATENT_FLIP_STD_KEY: full(0.25)}
    tars = [
        [member for index in range(per_shard) for member in sample_members(f"{shard:05d}{index:04d}", full(2), text, "c", extra)]
        for shard in range(shards)
    ]
    return write_encode_output(root, tars, BOTH_OPTIONS)


def test_flips_half_the_time_and_draws_mean_plus_std_times_noise(tmp_path):
    data = load_latent_data(constant_latent_run(tmp_path / "run"))
    samples = [(shard, index) for shard in range(2) for index in range(200)]
    latents = data.batch(samples, torch.Generator().manual_seed(0))["latents"]

    flipped = latents.mean(dim=(1, 2, 3)) < 0
    assert 0.35 < flipped.float().mean() < 0.65
    mean = torch.where(flipped[:, None, None, None], -2.0, 2.0)
    residual = latents - mean
    assert abs(residual.mean()) < 0.01
    # std across samples, element by element: the noise is fresh per sample, not one shared draw
    assert residual[~flipped].std(dim=0).mean() == pytest.approx(0.5, rel=0.05)
    assert residual[flipped].std(dim=0).mean() == pytest.approx(0.25, rel=0.05)  # the mirrored copy's own std


def test_a_sample_missing_or_with_a_bad_std_member_is_counted_as_incomplete():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(LATENT_SHAPE).astype(np.float16)
    text = rng.standard_normal(TEXT_SHAPE).astype(np.float16)
    std = np.full(LATENT_SHAPE, 0.1, np.float16)
    members = sample_members("good", latent, text, "fine", {layout.LATENT_STD_KEY: std})
    members += sample_members("nostd", latent, text, "x")
    members += sample_members("wrongshape", latent, text, "x", {layout.LATENT_STD_KEY: std[:2]})
    members += sample_members("nan", latent, text, "x", {layout.LATENT_STD_KEY: np.full(LATENT_SHAPE, np.nan, np.float16)})
    wanted = (layout.LATENT_KEY, layout.LATENT_STD_KEY)

    shard = read_latent_shard(io.BytesIO(shard_bytes(members)), "a.tar", LATENT_SHAPE, TEXT_SHAPE, wanted)
    assert (len(shard), shard.incomplete_samples, shard.truncated) == (1, 3, False)
    np.testing.assert_array_equal(shard.latents[layout.LATENT_STD_KEY][0], std)
    assert shard.latents[layout.LATENT_STD_KEY].dtype == np.float16


def test_bad_samples_and_truncated_shards_are_counted_not_fatal():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(LATENT_SHAPE).astype(np.float16)
    text = rng.standard_normal(TEXT_SHAPE).astype(np.float16)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    members = sample_members("good", latent, text, "fine")
    members += [("nolatent.text.npy", members[1][1])]  # missing its latent
    members += [("pickled.latent.npy", pickled.getvalue()), ("pickled.text.npy", members[1][1])]
    members += sample_members("wrongshape", latent[:2], text, "x")
    members += sample_members("nan", np.full(LATENT_SHAPE, np.nan, np.float16), text, "x")
    members += sample_members("last", latent, text, "fine")
    whole = shard_bytes(members)

    shard = read_latent_shard(io.BytesIO(whole), "a.tar", LATENT_SHAPE, TEXT_SHAPE)
    assert (len(shard), shard.incomplete_samples, shard.truncated) == (2, 4, False)

    cut = whole.index(b"last.text.npy")  # ends inside the last sample
    truncated = read_latent_shard(io.BytesIO(whole[: cut + 700]), "b.tar", LATENT_SHAPE, TEXT_SHAPE)
    assert truncated.truncated and len(truncated) == 1


def test_missing_encode_output_names_the_file(tmp_path):
    from pipeline.core.rundir import RunDir

    with pytest.raises(FileNotFoundError, match=layout.ENCODE_MANIFEST):
        load_latent_data(RunDir(tmp_path))


def test_a_raw_shard_split_into_parts_in_any_order_reads_as_the_same_shard(tmp_path):
    """Encode's write tasks may split a raw shard into several parts, in any order, differently on
    a rerun: training must see the same samples in the same order either way."""
    rng = np.random.default_rng(3)
    samples = [
        sample_members(
            f"k{index:03d}",
            rng.standard_normal(LATENT_SHAPE).astype(np.float16),
            rng.standard_normal(TEXT_SHAPE).astype(np.float16),
            f"caption {index}",
        )
        for index in range(12)
    ]

    def load(root, parts: dict[str, list[int]]):
        run = write_encode_output(
            root, [[member for index in indices for member in samples[index]] for indices in parts.values()]
        )
        names = [f"{stem}.tar" for stem in parts]
        for index, name in enumerate(names):  # rename 00000.tar... to the part names encode gives
            run.write_bytes(f"{layout.ENCODE_SHARDS}/{name}", run.read_bytes(f"{layout.ENCODE_SHARDS}/{index:05d}.tar"))
            run.remove(f"{layout.ENCODE_SHARDS}/{index:05d}.tar")
        manifest = run.read_json(layout.ENCODE_MANIFEST)
        entry = {"name": "00000", "parts": sorted(names), "samples": 12}
        run.write_json(layout.ENCODE_MANIFEST, {**manifest, "shards": sorted(names), "latent_shards": [entry]})
        return load_latent_data(run)

    whole = load(tmp_path / "a", {"00000-0123abcd": list(range(12))})
    split = load(tmp_path / "b", {"00000-ffff0000": [7, 2, 9, 0, 11], "00000-00001111": [5, 1, 10, 3, 8, 6, 4]})
    assert [shard.entry.name for shard in split.shards] == ["00000"] and split.shard_sizes == whole.shard_sizes == (12,)
    assert split.shards[0].by_bucket[""].keys == tuple(f"k{index:03d}" for index in range(12))
    np.testing.assert_array_equal(
        split.shards[0].by_bucket[""].latents[layout.LATENT_KEY], whole.shards[0].by_bucket[""].latents[layout.LATENT_KEY]
    )
    np.testing.assert_array_equal(split.shards[0].by_bucket[""].text_embeddings, whole.shards[0].by_bucket[""].text_embeddings)


def test_plain_tars_are_read_from_their_headers_as_tarfile_reads_them():
    """The fast reader (plain ustar members) and tarfile (anything else) find the same members; a
    damaged header, a cut or a long name falls back to tarfile, which says how far the archive is good."""
    from train.data import _plain_tar_members, _tarfile_members

    rng = np.random.default_rng(1)
    members = []
    for index in range(5):
        key = f"k{index}" if index != 3 else "d/" + "x" * 120  # a long name: GNU/pax headers
        members += sample_members(
            key, rng.standard_normal(LATENT_SHAPE).astype(np.float16), np.zeros(TEXT_SHAPE, np.float16), "c"
        )
    wanted = {layout.LATENT_KEY, layout.TEXT_EMBEDDING_KEY}
    plain = shard_bytes([member for member in members if "xxx" not in member[0]])
    assert _plain_tar_members(plain, wanted) == _tarfile_members(io.BytesIO(plain), wanted)
    assert len(_plain_tar_members(plain, wanted)[0]) == 4

    for data in (shard_bytes(members), plain[:5000], plain[:600] + b"\xff" + plain[601:]):
        found, truncated = read_latent_members(data, wanted)
        assert (found, truncated) == _tarfile_members(io.BytesIO(data), wanted)
    assert len(read_latent_members(shard_bytes(members), wanted)[0]) == 5
    assert read_latent_members(plain[:5000], wanted)[1]  # cut inside a member


def read_latent_members(data: bytes, wanted: set[str]):
    from train.data import read_tar_members

    return read_tar_members(io.BytesIO(data), wanted)
