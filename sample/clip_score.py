"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, text), 0),
averaged over (image, its prompt) pairs, with a transformers `CLIPModel`.

Images are preprocessed by transformers' PIL image processor (resize, centre crop, normalise
with the model's mean and std), never its torchvision one.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig, CLIPModel, CLIPTokenizer

from pipeline.core.models import resolve_model_path, subfolder_kwargs

try:  # transformers >= 5: the default CLIPImageProcessor needs torchvision; this one does not
    from transformers.models.clip import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor as ImageProcessor


def has_image_tower(name: str, subfolder: str | None = None) -> bool:
    """Is `name` a whole CLIPModel (config type 'clip'), not only its text tower ('clip_text_model')?"""
    return AutoConfig.from_pretrained(resolve_model_path(name), **subfolder_kwargs(subfolder)).model_type == "clip"


def _embedding(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    def __init__(self, name: str, subfolder: str | None = None, device: torch.device | str = "cpu"):
        path = resolve_model_path(name)
        self.model = (
            CLIPModel.from_pretrained(path, use_safetensors=True, **subfolder_kwargs(subfolder))
            .eval()
            .requires_grad_(False)
            .to(device)
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(path, **subfolder_kwargs(subfolder))
        try:
            self.processor = ImageProcessor.from_pretrained(path, **subfolder_kwargs(subfolder))
        except (OSError, ValueError):  # no preprocessor_config.json: CLIP's defaults at the model's size
            side = self.model.config.vision_config.image_size
            self.processor = ImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    @torch.inference_mode()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> unit vectors [N, D]."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.model.device)
        return torch.nn.functional.normalize(_embedding(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.model.device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(_embedding(output).float(), dim=-1)

    def score(self, images: np.ndarray, texts: list[str]) -> float:
        """Mean of 100 * max(cos, 0) over the pairs (images[i], texts[i])."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        cosine = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)
        return float((100 * cosine.clamp(min=0)).mean())
