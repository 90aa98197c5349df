"""Regeneration: does the model still redraw the concept from noise that encodes it? A model that
knows the concept (the inverter, the base model by default) inverts renders of it exactly with
O-BELM (``T2IModel.invert``); the attacked model then generates from those states under the same
prompts. The inverter redraws its renders exactly; a model that never learned the concept (the
retrain oracle) draws it in few of them, because the states alone do not carry it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...models.zoo import DEFAULT_T2I, load_t2i
from .base import Attack, AttackResult, ProbeSettings, concept_renders, concept_shown_rate, judged_rate, register_attack


@dataclass
class RegenerateConfig(ProbeSettings):
    renders: int = field(default=16, metadata={"help": "renders of the concept to invert"})
    steps: int = field(default=20, metadata={"help": "O-BELM steps, inverting and regenerating"})
    inverter: str = field(default=DEFAULT_T2I, metadata={
        "help": "model that inverts the renders (a zoo name or folder): one that knows the concept, the store's base"})

    def __post_init__(self):
        if self.renders <= 0 or self.steps <= 0:
            raise ValueError(f"renders and steps must be positive, got {self.renders} and {self.steps}")


@register_attack
class RegenerateAttack(Attack):
    name = "regenerate"
    description = "invert renders of the concept with a model that knows it (exact O-BELM); regenerate with this one"
    config_class = RegenerateConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        images, texts = concept_renders(prompts, concept, cfg.renders, seed)
        inverter = load_t2i(cfg.inverter).to(model.device).eval()
        states = inverter.invert(images.to(model.device), texts, cfg.steps)
        after = judged_rate(judge, model.regenerate(states, texts, cfg.steps), concept, prompts)
        by_inverter = judged_rate(judge, inverter.regenerate(states, texts, cfg.steps), concept, prompts)
        return AttackResult(self.name, concept, before=concept_shown_rate(model, judge, concept, prompts, cfg, seed),
                            after=after, details={"inverter": cfg.inverter, "inverter_redraws": by_inverter,
                                                  "renders": cfg.renders, "steps": cfg.steps})
