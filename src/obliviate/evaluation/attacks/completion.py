"""Completion: a model that knows the concept (the base, by default) takes the first m denoising
steps of the concept's prompts and the attacked model the rest. If a few steps of the base's
layout are enough for the attacked model to finish the concept, the erasure only blocks its
start. The retrain oracle gets the same hand-overs: the curve is read against its curve."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models.t2i import make_scheduler
from ...models.zoo import DEFAULT_T2I, load_t2i
from .base import Attack, AttackResult, ProbeSettings, concept_prompts, curve_auc, judged_rate, register_attack


@dataclass
class CompletionConfig(ProbeSettings):
    handoffs: tuple[int, ...] = field(default=(0, 2, 4, 6), metadata={
        "help": "denoising steps the starting model takes before handing over (0 = the attacked model alone)"})
    starter: str = field(default=DEFAULT_T2I, metadata={
        "help": "model that takes the first steps (a zoo name or folder): one that knows the concept, the store's base"})

    def __post_init__(self):
        if not self.handoffs or min(self.handoffs) < 0 or max(self.handoffs) >= self.sampling_steps:
            raise ValueError(f"handoffs must be step counts from 0 to sampling_steps - 1 ({self.sampling_steps - 1}), "
                             f"got {self.handoffs}")


@register_attack
class CompletionAttack(Attack):
    name = "completion"
    description = "the base model draws the first m steps of the concept, this one finishes; success per m"
    config_class = CompletionConfig
    curve_axis = "steps by the starting model"

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        texts = concept_prompts(prompts, concept, cfg, seed)
        starter = load_t2i(cfg.starter).to(model.device).eval()
        noise = model.initial_noise(len(texts), seed).to(model.device)
        curve = []
        for handoff in sorted(set(cfg.handoffs)):
            scheduler = make_scheduler("dpm", model.scheduler.config)
            scheduler.set_timesteps(cfg.sampling_steps)
            latents = starter.denoise(noise * scheduler.init_noise_sigma, starter.encode(texts), scheduler,
                                      scheduler.timesteps[:handoff])
            latents = model.denoise(latents, model.encode(texts), scheduler, scheduler.timesteps[handoff:])
            curve.append((handoff, judged_rate(judge, model.from_latents(latents), concept, prompts)))
        return AttackResult(self.name, concept, before=curve[0][1], after=curve[-1][1], curve=tuple(curve),
                            details={"auc": curve_auc(curve), "starter": cfg.starter})
