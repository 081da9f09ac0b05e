"""Untrusted shard members and untrusted weights: a code-executing pickle never runs.

The payload is a pickle whose `__reduce__` calls `os.system("touch MARKER")`; every test
asserts MARKER was never created, and that the sample is counted or the load refused.

Shard readers (neither uses webdataset's decoders, which would unpickle `.pyd`/`.pkl`/`.pth`):
- encode's raw-shard reader `ingest.encode.shard_io.read_raw_samples`/`decode_shard`: tarfile, members
  kept as bytes; only the image (PIL), the caption (UTF-8) and the metadata (JSON) are decoded.
- train's latent-shard reader `train.data.read_latent_shard`: tarfile, only the `.npy` members
  it expects, through `np.load(allow_pickle=False)`.

Weight loaders checked (grep: torch.load, from_pretrained, load_state_dict, safetensors):
- `pipeline.core.models.load_vae` (diffusers `AutoencoderKL.from_pretrained`) and `load_text_encoder`
  (transformers `CLIPTextModel.from_pretrained`): `use_safetensors=True`, so a pickle-based
  `.bin` is refused by name; tested here. (Without it both libraries fall back to
  `torch.load(weights_only=True)`, which also refuses the payload, with a less clear error.)
- `load_tokenizer`: reads vocab.json/merges.txt, no weights.
- the UNet: training builds it from its config (`train.unet.build_unet`), or, when fine-tuning
  (`train.init_from`), loads it with `train.finetune.load_unet`, safetensors only (tested here);
  sampling loads our own exports (`sample.export.load_export`) with diffusers'
  `UNet2DConditionModel.from_pretrained(use_safetensors=True)`, tested here with a malicious
  `diffusion_pytorch_model.bin` (diffusers 0.42's own default, `weights_only=True`, refuses it too).
- `train.ema.ExponentialMovingAverage.load`: `torch.load(weights_only=True)`; tested here.
- `sample.fid`: `torch.load(weights_only=True)` or safetensors, refusing other pickles
  (tests/sample); `sample.clip_score`: `CLIPModel.from_pretrained(use_safetensors=True)`.
- DeepSpeed's `engine.load_checkpoint` and `ds_to_universal` call `torch.load(weights_only=False)`;
  resume and `make_universal` run them inside `train.safe_load.weights_only_loads` (weights_only=True
  and an allowlist): a planted checkpoint is refused, tested in tests/train/test_checkpoint_untrusted.py.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import torch
from synthetic_latents import LATENT_SHAPE, TEXT_SHAPE, shard_bytes

from ingest.encode import shard_io as encode_io
from pipeline.core import layout, models
from pipeline.core.arrays import to_npy_bytes
from pipeline.core.rundir import RunDir
from pipeline.core.toy import generate
from train.data import read_latent_shard
from train.ema import ExponentialMovingAverage


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a pickle payload was executed"


def payloads(marker) -> dict[str, bytes]:
    """The same payload as a raw pickle, a torch.save file and an object-dtype .npy."""
    pickled = io.BytesIO()
    torch.save({"weight": Payload(marker)}, pickled)
    npy = io.BytesIO()
    np.save(npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    import pickle

    return {
        "pkl": pickle.dumps(Payload(marker)),
        "pth": pickled.getvalue(),
        "pyd": pickle.dumps(Payload(marker)),
        "npy": npy.getvalue(),
    }


def jpeg(index: int) -> bytes:
    out = io.BytesIO()
    generate(index + 1, 64, 0)[index][1].save(out, format="JPEG")
    return out.getvalue()


# -- shard members ---------------------------------------------------------------------------
def test_encode_never_unpickles_raw_shard_members(tmp_path, marker):
    evil = payloads(marker)
    members = [
        # a whole sample plus pickled members: the sample is kept, the pickles ignored
        ("a.jpg", jpeg(0)),
        ("a.txt", b"a caption"),
        ("a.json", b"{}"),
        ("a.pkl", evil["pkl"]),
        ("a.pth", evil["pth"]),
        ("a.pyd", evil["pyd"]),
        # pickles only, no image: counted as undecodable
        ("b.txt", b"b caption"),
        ("b.pkl", evil["pkl"]),
        ("b.pth", evil["pth"]),
        ("b.pyd", evil["pyd"]),
        # a pickle posing as the image: PIL refuses it
        ("c.jpg", evil["pkl"]),
        ("c.txt", b"c caption"),
    ]
    run = RunDir(tmp_path / "run")
    run.write_bytes(f"{layout.INGEST_SHARDS}/00000.tar", shard_bytes(members))
    *batches, last = encode_io.decode_shard(run, "00000.tar", encode_io.DecodeOptions(resolution=32, batch_size=8))
    assert [list(batch["__key__"]) for batch in batches] == [["a"]]
    assert set(batches[0]) == {"__key__", "shard", "txt", "json", "pixels", "cls"}  # nothing else travels on (cls: -1, no labels)
    record = last[encode_io.RECORD]
    assert (record["samples"], record["valid"], record["undecodable"]) == (3, 1, 2)


def test_training_never_unpickles_latent_shard_members(marker):
    evil = payloads(marker)
    latent, text = np.zeros(LATENT_SHAPE, np.float16), np.zeros(TEXT_SHAPE, np.float16)
    members = [
        # a whole sample plus pickled members: kept, the pickles ignored
        ("a.latent.npy", to_npy_bytes(latent)),
        ("a.text.npy", to_npy_bytes(text)),
        ("a.pkl", evil["pkl"]),
        ("a.pth", evil["pth"]),
        ("a.pyd", evil["pyd"]),
        # an object-dtype .npy (a pickle inside) as the latent: refused, counted incomplete
        ("b.latent.npy", evil["npy"]),
        ("b.text.npy", to_npy_bytes(text)),
        # a torch.save file named as the text embedding: not an .npy, counted incomplete
        ("c.latent.npy", to_npy_bytes(latent)),
        ("c.text.npy", evil["pth"]),
    ]
    shard = read_latent_shard(io.BytesIO(shard_bytes(members)), "s.tar", LATENT_SHAPE, TEXT_SHAPE)
    assert shard.keys == ("a",) and shard.incomplete_samples == 2


# -- weights ---------------------------------------------------------------------------------
def malicious_model_dir(root, builtin: str, weights_name: str, marker) -> str:
    """A model folder with a real config and only a pickle-based weights file carrying the payload."""
    root.mkdir(parents=True)
    shutil.copy(models.ASSETS_DIR / builtin / "config.json", root / "config.json")
    torch.save({"weight": Payload(marker)}, root / weights_name)
    return str(root)


def test_vae_with_pickle_weights_is_refused(tmp_path, marker):
    path = malicious_model_dir(tmp_path / "vae", "vae", "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError, match=r"diffusion_pytorch_model\.safetensors"):
        models.load_vae(path)


def test_text_encoder_with_pickle_weights_is_refused(tmp_path, marker):
    path = malicious_model_dir(tmp_path / "text_encoder", "text_encoder", "pytorch_model.bin", marker)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        models.load_text_encoder(path)


def test_the_builtin_models_still_load_from_safetensors():
    assert models.load_vae("builtin:tiny-vae") is not None
    assert models.load_text_encoder("builtin:tiny-text-encoder") is not None


def test_an_exported_unet_folder_with_pickle_weights_is_refused(tmp_path, marker):
    from diffusers import UNet2DConditionModel

    from pipeline.core import layout
    from pipeline.core.rundir import RunDir
    from sample.export import load_export
    from train.unet import build_unet

    run = RunDir(str(tmp_path / "run"))
    export = tmp_path / "run" / layout.TRAIN_EXPORT / layout.step_name(4)
    build_unet("tiny", cross_attention_dim=TEXT_SHAPE[1], sample_size=8).save_config(export / "unet")
    torch.save({"weight": Payload(marker)}, export / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):  # how sampling loads an export: safetensors only
        load_export(run, 4, str(tmp_path / "scratch"), torch.device("cpu"))
    with pytest.raises(OSError):  # and diffusers' own default refuses the payload too
        UNet2DConditionModel.from_pretrained(export / "unet", torch_dtype=torch.float32)


def test_a_fine_tuning_init_model_with_pickle_weights_is_refused(tmp_path, marker):
    from train.finetune import load_unet
    from train.unet import build_unet

    folder = tmp_path / "init"
    build_unet("tiny", cross_attention_dim=TEXT_SHAPE[1], sample_size=8).save_config(folder)
    torch.save({"weight": Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_unet(folder, sample_size=8)


def test_an_ema_file_with_a_payload_is_refused(tmp_path, marker):
    from train.ema import EMA_DIR

    ema = ExponentialMovingAverage(torch.nn.Linear(2, 2), decay=0.9)
    (tmp_path / EMA_DIR).mkdir()
    torch.save({"updates": 1, "averages": [Payload(marker)]}, tmp_path / EMA_DIR / "whole.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        ema.load(tmp_path)
