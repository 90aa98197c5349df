"""Judges of what a text-to-image model outside the embedded world draws.

``FreeTextEvaluator`` asks two things of a judge (``ConceptJudge``): which of some named concepts
each image shows, and a feature vector per image (for the Fréchet distance). A user's own
classifier plugs in by implementing those two methods. A judge that also embeds text and images
in one space (``ContrastiveJudge``, e.g. CLIP) additionally gives the CLIP score of image and
prompt. ``CLIPJudge`` is that judge for any transformers ``CLIPModel`` folder on disk.

Images are float tensors (N, 3, H, W) in [0, 1], as ``T2IModel.sample`` returns them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class ConceptJudge(Protocol):
    def scores(self, images: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
        """(N, len(concepts)) scores; the largest in a row is the concept the image shows."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, F) image features; the Fréchet distance compares their statistics."""


@runtime_checkable
class ContrastiveJudge(ConceptJudge, Protocol):
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings in the space ``text_embeddings`` maps into."""

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(M, D) text embeddings."""


# OpenAI CLIP's preprocessing, used when a folder has no preprocessor_config.json
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPJudge:
    """Zero-shot concept judge from a CLIP model: an image shows the concept whose text
    ``label_template.format(concept)`` is closest to it in cosine similarity. Features are the
    unit-normalised image embeddings.

    Preprocessing follows the folder's image processor (resize the short side, centre crop,
    normalise) but runs on tensors, so generated images never round-trip through 8-bit PIL."""

    def __init__(self, model, tokenizer, image_size: int, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, label_template: str = "a photo of {}"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.label_template = label_template

    @classmethod
    def from_folder(cls, folder: str | Path, label_template: str = "a photo of {}") -> "CLIPJudge":
        """Load a CLIP model saved with ``save_pretrained`` (config, weights, tokenizer files and,
        optionally, ``preprocessor_config.json``). Never reaches a hub: the folder must exist."""
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging

        logging.disable_progress_bar()
        folder = Path(folder)
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"No CLIP model at {folder}: expected a folder written by transformers' "
                             "CLIPModel.save_pretrained (config.json, weights, tokenizer files). Pass its path, not a hub id.")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(f"{folder} holds a {model_type!r} model; the judge must be a CLIP model (model_type 'clip').")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot load the CLIP judge at {folder}: {error}") from None
        size, mean, std = model.config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            settings = json.loads(processor.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
            crop = settings.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else crop
        return cls(model, tokenizer, size, mean, std, label_template)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "CLIPJudge":
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (N, 3, H, W), got {tuple(images.shape)}.")
        images = images.to(self.device, torch.float32)
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        images = images[..., top:top + self.image_size, left:left + self.image_size]
        return (images - self.mean.to(images)) / self.std.to(images)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return _unit(self.model.get_image_features(pixel_values=self.preprocess(images)))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**tokens))

    def scores(self, images: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
        labels = self.text_embeddings([self.label_template.format(c) for c in concepts])
        return self.image_embeddings(images) @ labels.T

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embeddings(images)


def _unit(output) -> torch.Tensor:
    """Unit-normalised projected embeddings; transformers 5 wraps them in an output object."""
    embeddings = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(embeddings, dim=-1).cpu()
