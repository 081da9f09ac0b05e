"""Hostile and broken input: each case is counted or refused with a clear message, never fatal.

Cases tested elsewhere (not repeated here):
- truncated tar, a file that is not a tar, non-image bytes, a truncated JPEG, a sample without
  an image: tests/ingest/encode/test_encode.py::test_decode_shard_counts_undecodable_missing_and_damaged
  (and, through the Ray stage, ::test_encode_stage_on_real_shards_with_damage_then_resumes_per_shard);
  a truncated latent tar: tests/train/test_data.py::test_bad_samples_and_truncated_shards_are_counted_not_fatal
- invalid UTF-8 captions: tests/ingest/encode/test_encode.py::test_captions_that_are_not_utf8_are_replaced_not_fatal,
  tests/ingest/download/test_url_list.py::test_jsonl_with_raw_invalid_bytes and ::test_csv_plain_and_gzip
- a decompression bomb, garbage and truncated images, a 1 MB caption, downloaded:
  tests/ingest/download/test_ingest_hostile.py (counted as too_large, not_an_image, caption_too_long)
- a URL list with wrong columns: tests/ingest/download/test_url_list.py::test_missing_column_fails_fast_naming_it

Here: what the encode stage's raw-shard reader does with the same kinds of input when a raw
shard comes from somewhere else than our ingest (member names with `../` or an absolute path, a
zero-byte or corrupt JPEG, a bomb, a 1 MB caption, metadata that is not UTF-8), and that no
reader of ours ever extracts a tar to disk.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from ingest.encode import shard_io as encode_io
from pipeline.core import layout
from pipeline.core.arrays import to_npy_bytes
from pipeline.core.config import IngestConfig
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate
from train.data import read_latent_shard

IMAGE = generate(1, 64, seed=3)[0][1]  # 64 x 64


def jpeg(image: Image.Image = IMAGE) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header declares side x side 1-bit pixels; a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress((b"\x00" + bytes(side // 8)) * 16, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with exactly these member names (TarWriter would refuse some of them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample(key: str, image: bytes, caption: bytes = b"a red circle", meta: bytes = b"{}") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", image), (f"{key}.txt", caption), (f"{key}.json", meta)]


def decode(tmp_path, members: list[tuple[str, bytes]], **options) -> tuple[list[str], dict, list[dict]]:
    """Kept keys, the shard's progress record and the batches, for a raw shard of `members`."""
    run = RunDir(tmp_path / "run")
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.tar", raw_tar(members))
    options = encode_io.DecodeOptions(resolution=32, batch_size=64, **options)
    *batches, last = encode_io.decode_shard(run, "00000.tar", options)  # last: the record the actor writes
    keys = [str(key) for batch in batches for key in batch["__key__"]]
    return keys, last[encode_io.RECORD], batches


@pytest.fixture
def no_extraction(monkeypatch):
    """Any extraction to disk fails the test: readers must only ever read members in memory."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reader extracted a tar member to disk")

    for name in ("extract", "extractall", "_extract_member"):
        monkeypatch.setattr(tarfile.TarFile, name, refuse)


def files_under(root) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def test_member_names_with_dotdot_or_absolute_paths_are_counted_and_never_written(tmp_path, monkeypatch, no_extraction):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a relative `../` would land next to it, if anything wrote it
    members = (
        sample("good0", jpeg())
        + sample("../escape", jpeg())
        + sample("../../escape2", jpeg())
        + sample(f"{tmp_path}/absolute", jpeg())
        + sample("ok/../../climb", jpeg())
        + sample("good1", jpeg())
    )
    keys, record, _ = decode(tmp_path, members)
    assert keys == ["good0", "good1"]
    assert record["samples"] == 6 and record["valid"] == 2 and record["undecodable"] == 4
    assert not record["truncated"] and not record["unreadable"]
    # Only the raw shard exists (the decode task hands its record to the actor): nothing was written from a member name.
    assert files_under(tmp_path) == {"run/ingest/shards/00000.tar"}


def test_the_latent_reader_reads_hostile_member_names_in_memory_only(tmp_path, monkeypatch, no_extraction):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    latent, text = np.zeros((4, 8, 8), np.float16), np.zeros((77, 64), np.float16)
    members = [
        ("../up.latent.npy", to_npy_bytes(latent)),
        ("../up.text.npy", to_npy_bytes(text)),
        (f"{tmp_path}/abs.latent.npy", to_npy_bytes(latent)),
        (f"{tmp_path}/abs.text.npy", to_npy_bytes(text)),
    ]
    shard = read_latent_shard(io.BytesIO(raw_tar(members)), "s.tar", (4, 8, 8), (77, 64))
    assert len(shard) == 2  # harmless here: arrays in memory, the names are never paths
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(b"", id="zero-byte"),
        pytest.param(jpeg()[:4] + bytes(300) + jpeg()[304:], id="corrupt-jpeg-header"),
        pytest.param(jpeg()[:20] + b"\xff\xd9", id="jpeg-without-a-scan"),
        pytest.param(b"\xff\xd8\xff" + bytes(5000), id="jpeg-magic-then-zeros"),
    ],
)
def test_zero_byte_and_corrupt_jpegs_are_counted_as_undecodable(tmp_path, image):
    keys, record, _ = decode(tmp_path, sample("bad", image) + sample("good", jpeg()))
    assert keys == ["good"]
    assert (record["samples"], record["valid"], record["undecodable"]) == (2, 1, 1)


def test_a_decompression_bomb_is_skipped_from_its_header_and_counted(tmp_path):
    keys, record, _ = decode(tmp_path, sample("bomb", bomb_png()) + sample("good", jpeg()))
    assert keys == ["good"] and record["undecodable"] == 1 and not record["error"]


def test_the_pixel_limit_is_ours_and_pils_warning_is_a_skip_not_a_decode(monkeypatch):
    image = {"jpg": jpeg()}  # 64 x 64 = 4096 pixels
    assert encode_io.decode_sample(image, 32, max_pixels=4096) is not None
    assert encode_io.decode_sample(image, 32, max_pixels=4095) is None
    # The stage passes ingest.max_megapixels; the default limit is the same number, not PIL's.
    assert int(IngestConfig().max_megapixels * 1e6) == encode_io.MAX_PIXELS
    # Between PIL's limit and twice it PIL only warns and decodes anyway; we skip.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(image["jpg"])).load()  # what PIL alone does: decode
    assert encode_io.decode_sample(image, 32) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice PIL's limit: its error, also a skip
    assert encode_io.decode_sample(image, 32) is None


def test_a_limit_below_an_image_counts_it_through_the_decode_task(tmp_path):
    keys, record, _ = decode(tmp_path, sample("big", jpeg()) + sample("small", jpeg(IMAGE.resize((32, 32)))), max_pixels=2000)
    assert keys == ["small"] and record["undecodable"] == 1


def test_a_1mb_caption_and_non_utf8_metadata_are_not_fatal(tmp_path):
    caption = b"red " * 250_000  # 1 MB: ingest drops it (caption_too_long); a foreign shard may carry it
    members = sample("long", jpeg(), caption=caption) + sample("meta", jpeg(), meta=b'{"a": "\xff\xfe"}')
    keys, record, batches = decode(tmp_path, members)
    assert keys == ["long", "meta"] and record["undecodable"] == 0
    (batch,) = batches
    assert batch["txt"][0] == caption.decode()  # the tokenizer truncates it to 77 tokens, as SD does
    assert json.loads(batch["json"][1]) == {"caption": "a red circle"}  # unreadable metadata: replaced by {}
