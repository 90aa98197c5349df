"""Output-projection protection: let the cross-attention output projections (``attn2.to_out.0``)
train beside the keys and values, and keep what they do to retained prompts.

    grad W_out <- grad W_out (I - V V^T),   V: top ``rank`` eigenvectors of sum_i o_i o_i^T,

where o_i are the inputs of each to_out layer (the attention outputs, one per image position) on
noisy images of retained prompts, of concepts earlier requests forgot (``forgotten_share``) and of
the empty prompt, recorded once at setup with the model the request starts from. Each layer has its
own V. It is a constraint of the composition contract, so W_out v = W_out,start v holds exactly
for v in span(V), beside adapters and every other constraint.

Why: an erasure in the keys and values is an edit of the token states that carry the concept, and
the text encoder reads words in context, so a later request's key/value edit of the states that
carry its own target ("red" in "a striped red triangle") moves the earlier concept's share of
them too and brings it back (``benchmarks/adapters/s10-final.md``). The output projection reads
what the attention gathered, whichever tokens it came from, so an erasure there need not depend on
the context it was trained in. Unprotected, it moves every image: on s10 (request seed 2) training
the whole cross-attention took IRA from 0.980 to 0.815 and FD to 3.5 times the base's. Protected,
it held striped through three requests (62 -> 71 of 72 images) with retention kept, but on all ten
requests it moved the misses between seeds rather than removing them (s10-final.md, "The output
projection beside keys and values"), so no recipe uses it yet.

The bias stays out: a bias shift moves every image alike and no LoRA file holds it, so train
``trainable=xattn-kvo`` (keys, values and the output projection's weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..training import OUT_PATTERN, ParameterConstraint, projection_inputs
from .base import Regularizer, register_regularizer
from .projection import check_shares, protected_prompts


@dataclass
class OutputProjectionConfig:
    rank: int = field(default=48, metadata={"help": "protected directions of each to_out layer's input"})
    prompts: int = field(default=256, metadata={"help": "protected prompts whose attention outputs span them"})
    sibling_share: float = field(default=0.5, metadata={"help": "share of prompts about the target's siblings"})
    forgotten_share: float = field(default=0.25, metadata={
        "help": "share of prompts naming concepts earlier requests forgot, so the output projection keeps their erasure"})
    draws: int = field(default=2, metadata={"help": "noise draws per prompt (images and timesteps)"})

    def __post_init__(self):
        if self.rank <= 0 or self.prompts <= 0 or self.draws <= 0:
            raise ValueError(f"rank, prompts and draws must be positive, got {self.rank}, {self.prompts}, {self.draws}")
        check_shares(self.sibling_share, self.forgotten_share)


def attention_output_grams(session, prompts: list[str], latents: torch.Tensor, draws: int) -> dict[str, torch.Tensor]:
    """sum o o^T (float64) of the inputs o of every cross-attention to_out layer of the trained
    model, by weight name, over ``prompts`` on noisy ``latents`` (cycled in chunks of their count)."""
    names = [n for n, _ in session.model.unet.named_parameters() if OUT_PATTERN.search(n)]
    layers = [f"unet.{n}" for n in names]
    chunks = [prompts[i:i + len(latents)] for i in range(0, len(prompts), len(latents))]
    encodings = [session.encode(chunk) for chunk in chunks]  # encoded once: only the noise changes between draws
    grams = {n: 0.0 for n in names}
    for _ in range(draws):
        for chunk, encoding in zip(chunks, encodings):
            noisy, t, _ = session.noisy(latents[:len(chunk)])
            inputs = projection_inputs(session.model, layers, noisy, t, encoding)
            for n, layer in zip(names, layers):
                grams[n] = grams[n] + inputs[layer].T @ inputs[layer]
    return grams


@register_regularizer
class OutputProjection(Regularizer):
    name = "outproj"
    description = "project cross-attention to_out updates off the attention outputs of retained prompts"
    config_class = OutputProjectionConfig

    def setup(self, session) -> None:
        cfg = self.config
        self.targets = [n for n in session.params if OUT_PATTERN.search(n)]
        if not self.targets:
            raise ValueError("outproj protects cross-attention output projections (attn2.to_out.0.weight), but none "
                             "of them train; use trainable=xattn-kvo (or xattn).")
        prompts = protected_prompts(session, cfg.prompts, cfg.sibling_share, cfg.forgotten_share)
        session.retain_batch()  # the frozen model draws the retained images once (preserve's too)
        latents = session.retain_latents
        prompts += [""] * len(latents)  # classifier-free guidance mixes the empty prompt into every image
        grams = attention_output_grams(session, prompts, latents, cfg.draws)
        self.bases = {}
        for name in self.targets:
            _, vectors = torch.linalg.eigh(grams[name])  # ascending: the top ones last
            self.bases[name] = vectors[:, -cfg.rank:].flip(1).float().contiguous()

    def constraints(self, session) -> dict[str, ParameterConstraint]:
        return {n: ParameterConstraint(self.name, protected=self.bases[n]) for n in self.targets}
