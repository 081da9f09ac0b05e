"""Encoding with aspect-ratio buckets: each image cropped to its nearest bucket (ingest.encode.crop),
the toy images at other aspect ratios, and decode and encoder batches of one bucket each."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from raw_shards import jpeg, write_raw_shard

from ingest.encode import crop as encode_crop
from ingest.encode import shard_io as encode_io
from pipeline.core import buckets
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate
from sample.judge import is_correct

KEEP_RATIO = "ingest.resize_mode='keep_ratio'"


def test_nearest_bucket_by_log_ratio_and_the_crop_that_covers_it():
    found = buckets.auto_buckets(64, 16)
    assert buckets.nearest_bucket(128, 64, found) == (96, 48) and buckets.nearest_bucket(64, 128, found) == (48, 96)
    assert buckets.nearest_bucket(102, 64, found) == (80, 48)  # 1.59:1 is nearer 5:3 than 2:1
    assert buckets.nearest_bucket(300, 290, found) == (64, 64)
    # By log ratio, 1.4:1 (log 0.34) is nearer 5:3 (log 0.51) than 1:1, although 1.4 - 1 < 1.67 - 1.4 is not.
    assert buckets.nearest_bucket(140, 100, found) == (80, 48)

    crop = encode_crop.crop_geometry(102, 64, (80, 48))
    assert crop.resized == (80, 50) and (crop.left, crop.top) == (0, 1)
    assert crop.cropped_share == pytest.approx(1 - 80 * 48 / (80 * 50))
    exact = encode_crop.crop_geometry(128, 64, (96, 48))
    assert exact.resized == (96, 48) and exact.cropped_share == 0
    assert encode_crop.square_cropped_share(128, 64) == pytest.approx(0.5)
    assert exact.record() == {"bucket": [96, 48], "original_size": [128, 64], "crop_top_left": [0, 0]}

    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 100))  # a blue left edge the 96x48 crop keeps (2:1 fits exactly)
    pixels, crop = encode_crop.crop_to_bucket(image, found)
    assert pixels.shape == (48, 96, 3) and crop.bucket == (96, 48) and crop.original == (200, 100)
    assert (pixels[:, 0] == [0, 0, 255]).all() and (pixels[:, -1] == [255, 0, 0]).all()


def test_toy_images_take_the_aspect_ratios_and_the_judge_still_reads_them():
    ratios = [1.0, 1.6, 0.625, 2.0, 0.5]
    drawn = generate(40, 64, 0, aspect_ratios=ratios)
    sizes = {image.size for _, image in drawn}
    assert sizes == {(64, 64), (102, 64), (64, 102), (128, 64), (64, 128)}
    assert all(is_correct(np.asarray(image), spec) for spec, image in drawn)
    square = generate(5, 64, 0)  # unset: the same square images as before (no extra draws)
    assert [np.asarray(i).tobytes() for _, i in square] == [np.asarray(i).tobytes() for _, i in generate(5, 64, 0, None)]


def test_img2dataset_keep_ratio_keeps_the_toy_images_shape():
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False)
    for size in [(128, 64), (64, 102)]:
        data = jpeg(Image.new("RGB", size, (30, 60, 220)))
        _, width, height, *_ = resizer(io.BytesIO(data))
        assert (width, height) == size


def test_decode_shard_yields_one_bucket_per_batch_and_records_the_crop(tmp_path):
    run = RunDir(tmp_path)
    found = buckets.auto_buckets(64, 16)
    drawn = generate(12, 64, 1, aspect_ratios=[1.0, 2.0, 0.5])
    samples = [{"__key__": f"k{i:02d}", "jpg": jpeg(image), "txt": spec.caption} for i, (spec, image) in enumerate(drawn)]
    name = write_raw_shard(run, 0, samples)
    *batches, last = encode_io.decode_shard(run, name, encode_io.DecodeOptions(resolution=64, batch_size=3, buckets=found))
    expected = {
        key: buckets.nearest_bucket(*image.size, found) for key, (_, image) in zip([s["__key__"] for s in samples], drawn)
    }
    assert sorted(key for batch in batches for key in batch["__key__"]) == sorted(expected)
    for batch in batches:
        shapes = {buckets.nearest_bucket(*drawn[int(key[1:])][1].size, found) for key in batch["__key__"]}
        assert len(shapes) == 1 and batch["pixels"].shape[1:3] == tuple(reversed(shapes.pop()))
        for key, meta in zip(batch["__key__"], batch["json"]):
            meta = json.loads(meta)
            assert meta["bucket"] == list(expected[key]) and meta["original_size"] == list(drawn[int(key[1:])][1].size)
    record = last[encode_io.RECORD]  # the decode task's last item: the shard's record, for the actor to write
    counts = {buckets.bucket_name(b): list(expected.values()).count(b) for b in set(expected.values())}
    assert record["buckets"] == counts and record["valid"] == 12
    square = sum(encode_crop.square_cropped_share(*image.size) for _, image in drawn)
    assert record["square_cropped_share_sum"] == pytest.approx(square) and record["cropped_share_sum"] < square / 10
