"""Concept inversion (Pham et al., 2023): learn a new token embedding from images of the
forgotten concept (textual inversion against the unlearned model), then prompt with it in the
concept's place. If a new word brings the concept back, the erasure only cut the old word."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Attack, AttackResult, ProbeSettings, concept_renders, concept_shown_rate, fixed_objective, register_attack

PLACEHOLDERS = ("sks", "object", "thing")  # any single token: its embedding is replaced


@dataclass
class InversionConfig(ProbeSettings):
    iterations: int = field(default=100, metadata={"help": "optimisation steps"})
    learning_rate: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    renders: int = field(default=16, metadata={"help": "images of the concept to invert"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})

    def __post_init__(self):
        if self.iterations < 0 or self.renders <= 0 or self.batch_size <= 0:
            raise ValueError("renders and batch_size must be positive; iterations >= 0")


def single_token_placeholder(text_encoder) -> tuple[str, int]:
    for word in PLACEHOLDERS:
        ids = text_encoder.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return word, ids[0]
    raise ValueError(f"None of {PLACEHOLDERS} is a single token for this tokenizer; cannot place a learned token.")


@register_attack
class InversionAttack(Attack):
    name = "inversion"
    description = "textual inversion of the concept against the unlearned model"
    config_class = InversionConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        word, token_id = single_token_placeholder(model.text_encoder)
        # the learned token takes the concept's place in every domain the concept names; the
        # prompts are built from labels, so no other word is touched
        placeholder = {domain: word for domain in prompts.target_groups((concept,))[0]}
        images, texts = concept_renders(prompts, concept, cfg.renders, seed, placeholder)
        clean_all = model.to_latents(images).detach()
        with torch.no_grad():
            start = model.text_encoder.embed_tokens(torch.tensor([[token_id]], device=model.device))[0, 0]
        vector = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([vector], lr=cfg.learning_rate)
        generator = torch.Generator().manual_seed(seed)
        model.unet.requires_grad_(False)

        def replace_with(v):
            return lambda ids, emb: torch.where((ids == token_id)[..., None], v.to(emb), emb)

        objective_before = fixed_objective(model, clean_all, lambda ts: model.encode_with_embeddings(ts, replace_with(vector)), texts, seed)
        for _ in range(cfg.iterations):
            index = torch.randint(0, len(texts), (cfg.batch_size,), generator=generator)
            loss = model.denoising_loss(clean_all[index], model.encode_with_embeddings([texts[i] for i in index], replace_with(vector)),
                                        generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        objective_after = fixed_objective(model, clean_all, lambda ts: model.encode_with_embeddings(ts, replace_with(vector)), texts, seed)
        before = concept_shown_rate(model, judge, concept, prompts, cfg, seed)
        learned = vector.detach()
        after = concept_shown_rate(model, judge, concept, prompts, cfg, seed, words=placeholder,
                                   encode=lambda ts: model.encode_with_embeddings(ts, replace_with(learned)))
        return AttackResult(self.name, concept, before, after, curve=((0, before), (cfg.iterations, after)),
                            details={"placeholder": word, "objective_before": objective_before, "objective_after": objective_after})

