"""Raw shards as the ingest stage leaves them (img2dataset's webdataset tars, their stats files and outcome records),
for the encode tests and others that start from raw images."""

import io
import json

from PIL import Image
from webdataset import TarWriter

from pipeline.core import layout
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def raw_samples(prefix: str, count: int, seed: int = 0) -> list[dict]:
    """Toy samples as img2dataset writes them (jpg, txt, json)."""
    return [
        {"__key__": f"{prefix}{index:04d}", "jpg": jpeg(image), "txt": spec.caption, "json": json.dumps({"key": index}).encode()}
        for index, (spec, image) in enumerate(generate(count, 64, seed))
    ]


def write_raw_shard(run: RunDir, number: int, samples: list[dict]) -> str:
    """A raw shard the way ingest leaves it: the tar, then its stats file."""
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for sample in samples:
            writer.write(
                {key: value.encode() if isinstance(value, str) and key != "__key__" else value for key, value in sample.items()}
            )
    return write_raw_bytes(run, number, buffer.getvalue())


def write_raw_bytes(run: RunDir, number: int, data: bytes) -> str:
    name = f"{number:05d}.tar"
    run.write_bytes(f"{layout.INGEST_SHARDS}/{name}", data)
    run.write_json(f"{layout.INGEST_SHARDS}/{number:05d}{layout.SHARD_STATS_SUFFIX}", {"successes": 0})
    outcome = {"shard": number, "attempted": 0, "succeeded": 0, "failed": {}, "bytes": len(data)}
    run.write_json(f"{layout.INGEST_SHARDS}/{number:05d}{layout.SHARD_OUTCOME_SUFFIX}", outcome)  # the completion marker
    return name
