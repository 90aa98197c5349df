"""Preservation of retained concepts: the model's predictions on prompts of concepts no request
has forgotten stay what they were at the start of the request,

    weight * || eps_theta(x_t, c_r) - eps_start(x_t, c_r) ||^2,

on noisy images the start model drew for those prompts (data-free), recorded once at setup.
The prior-preservation term of concept ablation and MACE, as an add-on for any gradient method:
ESD has none, and a request's update then moves retained prompts wherever the constraints
(``gradproj``'s protected token subspace, ``l2sp``'s pull) leave it free to.

The prompts come from the prompt source's training templates and never show a target or a
concept an earlier request forgot; a store that names nothing to retain uses the empty prompt.

``supertypes`` adds prompts that name the supertype of a target or of a concept forgotten earlier
in a retained member's place ("a dotted cool square"), held to the start model's predictions for
that member ("a dotted green square") on its images. No request trains on a supertype word, so
nothing held them: erasing blue alone took the images of the prompts naming "cool" that show a
cool colour from 71% to 2%. Held to their own predictions, those prompts would fight the erasure
wherever they drew the member being erased; held to a retained member's, they keep drawing the
members that remain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Regularizer, register_regularizer
from .kept import KeptPredictions


@dataclass
class PreservationConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of the loss on retained prompts"})
    prompts: int = field(default=16, metadata={"help": "retained prompts (and start-model images) it holds"})
    supertypes: int = field(default=0, metadata={
        "help": "prompts added that name the supertype of a target or of a concept forgotten earlier in a retained "
                "member's place (\"a dotted cool square\"), held to that member's predictions, so prompts naming a "
                "supertype keep drawing its remaining members"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.prompts <= 0:
            raise ValueError(f"prompts must be positive, got {self.prompts}")
        if self.supertypes < 0:
            raise ValueError(f"supertypes must be >= 0, got {self.supertypes}")


@register_regularizer
class Preservation(Regularizer):
    name = "preserve"
    description = "keep the predictions on retained prompts as they were at the start of the request (prior preservation)"
    config_class = PreservationConfig

    def setup(self, session) -> None:
        self.kept = None
        if self.config.weight:
            prompts = session.retain_prompts(self.config.prompts)
            pairs = []
            if self.config.supertypes:
                forgotten = session.context.forgotten + session.targets
                pairs = session.prompts.supertype_pairs(forgotten, self.config.supertypes, session.rng)
            references = prompts + [p.anchor for p in pairs]
            self.kept = KeptPredictions(session, prompts + [p.target for p in pairs], session.draw_latents(references),
                                        references=references)

    def penalty(self, session):
        return None if self.kept is None else self.config.weight * self.kept.distance(session)
