"""Class labels: metadata values to indices, the class list, the config checks, and latent shards carrying labels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from synthetic_latents import sample_members, shard_bytes

from ingest.encode.class_labels import class_value, label_of, sorted_classes
from pipeline.core import layout
from pipeline.core.config import ConfigError, load_config
from pipeline.runner import fingerprints
from train.data import read_latent_shard

LATENT, TEXT = (4, 2, 2), (77, 8)


def test_values_map_to_indices_and_anything_else_is_skipped():
    classes = ["circle", "square", "3"]
    assert label_of(b'{"shape": "square"}', "shape", classes) == 1
    assert label_of({"shape": 3.0}, "shape", classes) == 2  # a number matches its decimal name
    for meta in (b'{"shape": "star"}', b'{"colour": "red"}', b"not json", b'{"shape": null}', b'{"shape": [1]}', b"[]", None):
        assert label_of(meta, "shape", classes) is None, meta
    assert class_value({"shape": " circle "}, "shape") == "circle"


def test_class_list_sorts_numbers_numerically():
    assert sorted_classes(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sorted_classes(["triangle", "circle", "3", "square"]) == ["3", "circle", "square", "triangle"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.conditioning=class"], "needs encode.class_field"),
        (['encode.classes=["a"]'], "classes is set but class_field is not"),
        (["encode.class_field=shape", 'encode.classes=["a", "a"]'], "classes has duplicates"),
        (['sample.class_labels=["circle"]'], "sample.class_labels is set but train.conditioning has no 'class'"),
        (
            ["train.conditioning=class", "encode.class_field=shape", 'encode.classes=["circle"]', 'sample.class_labels=["star"]'],
            r"sample.class_labels \['star'\] are not in encode.classes",
        ),
        (["train.conditioning=pictures"], "train.conditioning"),
    ],
)
def test_bad_class_config_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=overrides)


def test_the_text_default_keeps_fingerprints_and_class_mode_changes_them(monkeypatch):
    text = fingerprints(load_config("tiny"))
    classes = fingerprints(load_config("tiny", overrides=["train.conditioning=class", "encode.class_field=shape"]))
    assert classes["ingest"] == text["ingest"] and classes["encode"] != text["encode"] and classes["train"] != text["train"]
    monkeypatch.setattr("pipeline.runner.NEUTRAL_DEFAULTS", {})
    assert fingerprints(load_config("tiny"))["train"] != text["train"]  # so the default is indeed left out


def test_latent_shards_carry_labels_and_bad_ones_are_incomplete():
    rng = np.random.default_rng(0)

    def sample(key: str, label: bytes | None) -> list[tuple[str, bytes]]:
        members = sample_members(
            key, rng.standard_normal(LATENT).astype(np.float16), rng.standard_normal(TEXT).astype(np.float16), "x"
        )
        return members + ([(f"{key}.{layout.CLASS_KEY}", label)] if label is not None else [])

    tar = shard_bytes(sample("a", b"2") + sample("b", b"0") + sample("c", b"3") + sample("d", None) + sample("e", b"x"))
    shard = read_latent_shard(io.BytesIO(tar), "s", LATENT, TEXT, class_count=3)
    assert shard.keys == ("a", "b") and shard.class_labels.tolist() == [2, 0]
    assert shard.incomplete_samples == 3  # out of range, missing, not a number
    plain = read_latent_shard(io.BytesIO(tar), "s", LATENT, TEXT)
    assert len(plain) == 5 and plain.class_labels is None
