"""Rehearsal of earlier erasures: a loss on prompts of concepts that earlier requests forgot,
added to the request's own, so that training for a new request does not move their predictions
back (in the s10 sequence, later shape requests revive circle). Two objectives:

- ``keep`` (default): the model's predictions on those prompts stay what they were at the start
  of the request, ``weight * || eps_theta(x_t, c_old) - eps_start(x_t, c_old) ||^2`` on noisy
  images fixed at setup, where the start model's predictions are recorded once;
- ``method``: the running method's own loss on them, each paired with its plain description as
  the anchor (the empty prompt for free text; earlier requests' own anchors are not kept), or
  with the method's ``swap_anchors`` with a retained concept in its place, so the erasure is
  trained again.

The earlier concepts' prompts come from the prompt source's training templates, never naming
the request's own targets, except with ``combined``: that share of them also shows a target, with
the anchor dropping both ("a striped red triangle" / "a triangle" while red follows striped).
Later colour requests wear striped down on exactly such prompts (s10-final.md, "How often the
recipe meets the bar"). Their x_0 images are drawn by the model training starts from, which
already has them erased, or with ``images=pretrained`` by the pretrained weights, which still draw
them: the loss then covers the noisy images a revival would pass through. On s10 (seed 1, the
method objective) that held every earlier concept at 71 of 72 images or more, where the start
model's images left striped and dotted at 60-68. Nothing is kept between requests: the store's
``forgotten`` list (and its pretrained weights) is the only input.

Beside a regularizer that names other start weights (``merge``'s independent mode trains each
request from the pretrained model), "the start" is those weights: ``keep`` then holds this
request's task vector off the earlier concepts (their predictions stay the pretrained model's,
and the merge keeps their own task vectors' erasure), and ``method`` trains their erasure into
this task vector again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..world import PromptPair
from .base import Regularizer, register_regularizer
from .kept import KeptPredictions


@dataclass
class RehearsalConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of the loss on earlier-forgotten concepts"})
    prompts: int = field(default=16, metadata={
        "help": "prompts (and images) of earlier-forgotten concepts, the concepts drawn at random"})
    objective: Literal["keep", "method"] = field(default="keep", metadata={
        "help": "'keep': their predictions stay as at the start of the request; 'method': the method's own loss on them"})
    combined: float = field(default=0.0, metadata={
        "help": "share of each earlier concept's prompts that also show a target of the request, their anchor without "
                "either (objective=method only): the loss then erases both where they meet, where later requests "
                "otherwise wear the earlier erasure down (0: never, the prompts leave the targets out)"})
    images: Literal["start", "pretrained"] = field(default="start", metadata={
        "help": "which model draws their x_0 images: 'start' (the model this request starts from, which has them erased) "
                "or 'pretrained' (which still draws them, so the loss sees the images a revival would produce)"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.prompts <= 0:
            raise ValueError(f"prompts must be positive, got {self.prompts}")
        if self.objective not in ("keep", "method"):
            raise ValueError(f"objective must be 'keep' or 'method', got {self.objective!r}")
        if not 0 <= self.combined <= 1:
            raise ValueError(f"combined must lie in [0, 1], got {self.combined}")
        if self.combined and self.objective != "method":
            raise ValueError("combined needs objective=method: 'keep' would hold the start model's predictions, which "
                             "still show the request's targets, on prompts that name them")


@register_regularizer
class Rehearsal(Regularizer):
    name = "rehearse"
    description = ("keep the predictions (or the method's loss) on concepts earlier requests forgot, so a new request "
                   "does not revive them")
    config_class = RehearsalConfig

    def setup(self, session) -> None:
        self.pairs = []
        earlier = [c for c in session.context.forgotten if c not in session.targets]
        if not earlier or not self.config.weight:
            return
        # one concept per call: a tuple of several would drop all their domains from the anchor
        concepts, counts = np.unique(session.rng.choice(len(earlier), self.config.prompts), return_counts=True)
        for concept, count in zip(concepts, counts):
            combined = self.combined_pairs(session, earlier[concept], int(count))
            self.pairs += combined + session.anchored_pairs((earlier[concept],), int(count) - len(combined),
                                                            avoid=session.targets)
        targets = [p.target for p in self.pairs]
        latents = session.draw_latents(targets, pretrained=self.config.images == "pretrained")
        if self.config.objective == "method":
            self.latents = latents
        else:  # the model has not trained yet: these are the start model's predictions
            self.kept = KeptPredictions(session, targets, latents)

    def combined_pairs(self, session, concept: str, count: int) -> list[PromptPair]:
        """About ``combined`` of ``count`` prompts showing ``concept`` with a target of the request
        (rounded at random), anchored without either; none when no target can share a prompt with it."""
        if not self.config.combined:
            return []  # and no draw from the rng: requests made before the option replay as they were
        share = count * self.config.combined
        n = int(share) + int(session.rng.random() < share - int(share))
        terms = []
        for target in session.targets:
            try:
                session.prompts.validate((f"{concept} {target}",), None)
                terms.append(f"{concept} {target}")
            except ValueError:  # two concepts of one domain never share a prompt
                pass
        if not n or not terms:
            return []
        picks = session.rng.choice(len(terms), n)
        return [pair for i in picks for pair in session.prompts.forget_pairs((terms[i],), None, 1, session.rng)]

    def penalty(self, session):
        if not self.pairs:
            return None
        if self.config.objective == "keep":
            return self.config.weight * self.kept.distance(session)
        with session.forgetting([p.target for p in self.pairs], [p.anchor for p in self.pairs], self.latents):
            loss = session.objective(session)
        session.counter.count_backward()  # the loop's one backward call also runs back through this loss's UNet pass
        return self.config.weight * loss
