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

``unnamed`` adds prompts that leave the domain of a target or of a concept forgotten earlier
unnamed ("a red square"), held to the start model's predictions for the same prompt naming a
retained concept there ("a solid red square"). A model draws its default where a prompt names
nothing, and ``shapes-t2i``'s default texture is dotted (39 of 64 images of prompts naming no
texture): erasing dotted from prompts that name it leaves it drawn for the prompts that do not.
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
    unnamed: int = field(default=0, metadata={
        "help": "prompts added that leave the domain of a target or of a concept forgotten earlier unnamed (\"a red "
                "square\"), held to the predictions for the same prompt naming a retained concept there (\"a solid red "
                "square\"), so a forgotten concept stops being what the model draws where a prompt names none"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.prompts <= 0:
            raise ValueError(f"prompts must be positive, got {self.prompts}")
        if self.supertypes < 0 or self.unnamed < 0:
            raise ValueError(f"supertypes and unnamed must be >= 0, got {self.supertypes} and {self.unnamed}")


@register_regularizer
class Preservation(Regularizer):
    name = "preserve"
    description = "keep the predictions on retained prompts as they were at the start of the request (prior preservation)"
    config_class = PreservationConfig

    def setup(self, session) -> None:
        self.kept = None
        if self.config.weight:
            prompts = session.retain_prompts(self.config.prompts)
            pairs, forgotten = [], session.context.forgotten + session.targets
            if self.config.supertypes:
                pairs += session.prompts.supertype_pairs(forgotten, self.config.supertypes, session.rng)
            if self.config.unnamed:
                pairs += session.prompts.unnamed_pairs(forgotten, self.config.unnamed, session.rng)
            references = prompts + [p.anchor for p in pairs]
            self.kept = KeptPredictions(session, prompts + [p.target for p in pairs], session.draw_latents(references),
                                        references=references)

    def penalty(self, session):
        return None if self.kept is None else self.config.weight * self.kept.distance(session)
