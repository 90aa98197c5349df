"""Rehearsal of earlier erasures: the running method's own loss, applied to concepts that
earlier requests forgot, added to this request's loss,

    L = L_method(this request's targets) + weight * L_method(earlier targets),

so that training for a new request keeps the concepts before it erased instead of moving their
keys and values back (in the s10 sequence, later shape requests revive circle). The earlier
concepts' prompts come from the prompt source's training templates, each paired with its plain
description as the anchor (earlier requests' own anchors are not kept); their x_0 images are
drawn once per request by the frozen model, which already has them erased. Nothing is kept
between requests: the store's ``forgotten`` list is the only input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Regularizer, register_regularizer


@dataclass
class RehearsalConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of the method's loss on earlier-forgotten concepts"})
    prompts: int = field(default=16, metadata={
        "help": "prompts (and frozen-model images) of earlier-forgotten concepts, the concepts drawn at random"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.prompts <= 0:
            raise ValueError(f"prompts must be positive, got {self.prompts}")


@register_regularizer
class Rehearsal(Regularizer):
    name = "rehearse"
    description = "the method's own loss on concepts earlier requests forgot, so a new request does not revive them"
    config_class = RehearsalConfig

    def setup(self, session) -> None:
        self.pairs = []
        earlier = [c for c in session.context.forgotten if c not in session.targets]
        if not earlier or not self.config.weight:
            return
        # one concept per call: a tuple of several would drop all their domains from the anchor
        concepts, counts = np.unique(session.rng.choice(len(earlier), self.config.prompts), return_counts=True)
        for concept, count in zip(concepts, counts):
            self.pairs += session.prompts.forget_pairs((earlier[concept],), None, int(count), session.rng,
                                                       avoid=session.targets)
        self.latents = session.draw_latents([p.target for p in self.pairs])

    def penalty(self, session):
        if not self.pairs:
            return None
        with session.forgetting([p.target for p in self.pairs], [p.anchor for p in self.pairs], self.latents):
            loss = self.config.weight * session.objective(session)
        session.counter.count_backward()  # the loop's one backward call also runs back through this loss's UNet pass
        return loss
