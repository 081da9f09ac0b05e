"""The optional validation metrics: CLIP score and FID, each set up once per process or skipped with a note.

A metric is skipped, never fatal, when its model is not configured or cannot be loaded: the
reason goes into every validation entry (`skipped_metrics`) and the report.
"""

from __future__ import annotations

import io
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core import layout
from pipeline.core.config import PipelineConfig
from pipeline.core.log import get_logger
from pipeline.core.rundir import RunDir

logger = get_logger("sample")

FID_REFERENCE_CACHE = f"{layout.SAMPLE_VALIDATION.rsplit('/', 1)[0]}/fid_reference.npz"
# Toy reference images are drawn with config.seed + this: the same distribution as the training set, other images.
HELD_OUT_SEED_OFFSET = 1_000_003


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


class FidScorer:
    """FID of generated images against the reference set's Inception statistics (computed once, cached in the run)."""

    def __init__(self, config: PipelineConfig, run: RunDir, device: torch.device, resize: int = 299):
        from sample.fid import load_inception

        self.config, self.run = config, run
        self.inception = load_inception(config.sample.fid_inception, resize).to(device)
        self._reference: np.ndarray | None = None

    def reference_images(self, size: int) -> np.ndarray:
        sample = self.config.sample
        if sample.fid_reference:
            from sample.fid import read_reference_images

            return read_reference_images(sample.fid_reference, sample.fid_reference_count, size)
        from pipeline.core import toy
        from sample.fid import square

        drawn = toy.generate(
            sample.fid_reference_count, self.config.ingest.toy_image_size, self.config.seed + HELD_OUT_SEED_OFFSET
        )
        return np.stack([square(image, size) for _, image in drawn])

    def reference(self, size: int) -> np.ndarray:
        """Inception features [N, 2048] of the reference images, cached in sample/ for later processes."""
        from sample.fid import features

        if self._reference is not None:
            return self._reference
        sample = self.config.sample
        key = json.dumps(
            {
                "inception": sample.fid_inception,
                "bytes": Path(sample.fid_inception).stat().st_size,
                "reference": sample.fid_reference,
                "count": sample.fid_reference_count,
                "size": size,
                "resize": self.inception.resize,
                "seed": self.config.seed,
            }
        )
        if self.run.exists(FID_REFERENCE_CACHE):
            cached = np.load(io.BytesIO(self.run.read_bytes(FID_REFERENCE_CACHE)))
            if str(cached["key"]) == key:
                self._reference = cached["features"]
                return self._reference
        images = self.reference_images(size)
        if len(images) < 2:
            raise ValueError(
                f"sample.fid_reference = {sample.fid_reference!r} holds {len(images)} image(s); FID needs at least 2"
            )
        self._reference = features(self.inception, images)
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), features=self._reference)
        self.run.write_bytes(FID_REFERENCE_CACHE, buffer.getvalue())
        return self._reference

    def fid(self, images: np.ndarray) -> float:
        from sample.fid import features, fid_from_features

        return fid_from_features(features(self.inception, images), self.reference(images.shape[1]))


@dataclass
class Metrics:
    clip: object | None = None  # sample.clip_score.ClipScorer
    fid: FidScorer | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, config: PipelineConfig, run: RunDir, device: torch.device) -> Metrics:
        metrics = cls()
        metrics.clip = metrics._load_clip(config, device)
        metrics.fid = metrics._load_fid(config, run, device)
        for name, reason in metrics.skipped.items():
            logger.info(f"{name} skipped: {reason}")
        return metrics

    def _load_clip(self, config: PipelineConfig, device: torch.device):
        from sample.clip_score import ClipScorer, has_image_tower

        sample, encode = config.sample, config.encode
        if sample.clip_model:
            where, name, subfolder = "sample.clip_model", sample.clip_model, None
        else:  # e.g. openai/clip-vit-large-patch14 is a whole CLIPModel; SD's text_encoder/ subfolder is not
            where, name, subfolder = "encode.text_encoder", encode.text_encoder, encode.text_encoder_subfolder
        try:
            if not has_image_tower(name, subfolder):
                self.skipped["clip_score"] = f"{where} = {name!r} has no image tower (not a CLIPModel); set sample.clip_model"
                return None
            return ClipScorer(name, subfolder, device)
        except Exception as error:  # noqa: BLE001 - a missing optional model skips its metric
            self.skipped["clip_score"] = f"{where} = {name!r} could not be loaded: {_reason(error)}"
            return None

    def _load_fid(self, config: PipelineConfig, run: RunDir, device: torch.device) -> FidScorer | None:
        sample = config.sample
        if not sample.fid_inception:
            self.skipped["fid"] = "sample.fid_inception (pytorch-fid's Inception weights) is unset"
            return None
        if not Path(sample.fid_inception).is_file():
            self.skipped["fid"] = f"sample.fid_inception = {sample.fid_inception!r} does not exist"
            return None
        if not sample.fid_reference and config.ingest.source != "toy":
            self.skipped["fid"] = "sample.fid_reference (held-out images) is unset"
            return None
        try:
            return FidScorer(config, run, device)
        except Exception as error:  # noqa: BLE001 - as above
            self.skipped["fid"] = f"sample.fid_inception = {sample.fid_inception!r} could not be loaded: {_reason(error)}"
            return None

    def measure(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Metrics of one guidance scale's images [P, S, H, W, 3] (row p drawn for prompts[p])."""
        flat = images.reshape(-1, *images.shape[2:])
        out: dict[str, float] = {}
        if self.clip is not None:
            out["clip_score"] = self.clip.score(flat, [prompt for prompt in prompts for _ in range(images.shape[1])])
        if self.fid is not None and len(flat) >= 2:
            try:
                out["fid"] = self.fid.fid(flat)
            except Exception as error:  # noqa: BLE001 - e.g. an unreadable reference set: note it, keep validating
                self.skipped["fid"] = _reason(error)
                logger.warning(f"fid failed: {traceback.format_exc(limit=3)}")
                self.fid = None
        return out
