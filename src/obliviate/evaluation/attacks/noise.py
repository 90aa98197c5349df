"""Noise injection: sample the concept's prompts with DDIM's stochastic step (eta > 0 adds fresh
noise at every intermediate step). An erasure tuned to the deterministic sampler's path can
give way when the path is perturbed; success is the highest rate over the noise levels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...models.t2i import make_scheduler
from .base import Attack, AttackResult, ProbeSettings, concept_prompts, judged_rate, register_attack


@dataclass
class NoiseConfig(ProbeSettings):
    etas: tuple[float, ...] = field(default=(0.0, 0.5, 1.0), metadata={
        "help": "DDIM eta values (0 = deterministic, 1 = the DDPM posterior's full noise)"})

    def __post_init__(self):
        if not self.etas or min(self.etas) < 0 or max(self.etas) > 1:
            raise ValueError(f"etas must lie in [0, 1], got {self.etas}")


@register_attack
class NoiseAttack(Attack):
    name = "noise"
    description = "sample with extra noise at every intermediate step (DDIM eta); success at the worst eta"
    config_class = NoiseConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        texts = concept_prompts(prompts, concept, cfg, seed)
        noise = model.initial_noise(len(texts), seed).to(model.device)
        rates = {}
        for eta in sorted(set(cfg.etas)):
            scheduler = make_scheduler("ddim", model.scheduler.config)
            scheduler.set_timesteps(cfg.sampling_steps)
            latents = model.denoise(noise * scheduler.init_noise_sigma, model.encode(texts), scheduler, scheduler.timesteps,
                                    eta=eta, generator=torch.Generator().manual_seed(seed + 1))
            rates[eta] = judged_rate(judge, model.from_latents(latents), concept, prompts)
        worst = max(rates, key=rates.get)
        return AttackResult(self.name, concept, before=rates[min(rates)], after=rates[worst],
                            details={"rate_per_eta": rates, "worst_eta": worst})
