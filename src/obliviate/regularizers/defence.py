"""What the fine-tuning defences (``meta``, ``resalign``) share.

Each one asks how the model would look after an attacker fine-tuned it on the forgotten concept,
and pushes the weights so that the fine-tuned model still does not draw it. They share:

- a scratch copy of the UNet that the simulated attacker fine-tunes (the trained model is never
  touched), reloaded from the current weights before every simulation;
- the attacker's data: images of the targets that the frozen model drew at the start of the
  request (``TrainingSession.concept_batch``), never the world's renders that the evaluation's
  relearning attack fine-tunes on, so the defence cannot have trained on its test;
- the outer objective on the fine-tuned copy: the running method's own loss (it must still not
  draw the target in the method's sense) plus ``retain_weight`` times the distance of its
  retained-prompt predictions to the frozen model's (it must still draw everything else).

The simulated gradient enters the loop as a penalty whose value is zero and whose gradient is that
gradient (``linear_surrogate``), so it composes with every constraint and penalty by the contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..training import TRAINABLE_PRESETS, ScratchModule, TrainingSession, select_parameters
from .base import Regularizer


@dataclass
class DefenceConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of the simulated gradient beside the method's own"})
    retain_weight: float = field(default=1.0, metadata={
        "help": "weight of keeping retained predictions in the fine-tuned copy (zeta)"})
    attacker_trains: str = field(default="all", metadata={
        "help": f"what the simulated attacker fine-tunes: a preset ({', '.join(TRAINABLE_PRESETS)}) or a regex"})
    every: int = field(default=1, metadata={"help": "simulate on every n-th optimizer step (cost)"})

    def __post_init__(self):
        if self.weight < 0 or self.retain_weight < 0:
            raise ValueError(f"weight and retain_weight must be >= 0, got {self.weight} and {self.retain_weight}")
        if self.every <= 0:
            raise ValueError(f"every must be positive, got {self.every}")


class FineTuningDefence(Regularizer):
    """Base of the defences that simulate an attacker's fine-tuning (see the module docstring)."""

    def setup(self, session: TrainingSession) -> None:
        self.scratch = ScratchModule(session.model.unet)
        session.counter.watch(self.scratch.module)
        self.scratch_model = copy.copy(session.model)
        self.scratch_model.unet = self.scratch.module
        regex = TRAINABLE_PRESETS.get(self.config.attacker_trains, self.config.attacker_trains)
        self.attacker_params = list(select_parameters(self.scratch.module, regex))
        self.initial = {n: p.detach().clone() for n, p in self.scratch.parameters.items()}
        # drawn now, from the frozen model: nothing may be drawn while the scratch copy stands in
        session.concept_batch()
        session.retain_batch()

    def current_weights(self, session: TrainingSession) -> dict[str, torch.Tensor]:
        return {**self.initial, **{n: p.detach() for n, p in session.params.items()}}

    def attacker_loss(self, session: TrainingSession) -> Callable[[], torch.Tensor]:
        """The simulated attacker's denoising loss on one fixed batch of the frozen model's images
        of the targets (fixed noise too, so repeated calls measure the same function)."""
        batch = session.concept_batch()
        encoding = session.encode(batch.prompts)
        target = self.scratch_model.training_target(batch.clean, batch.noise, batch.t)

        def loss() -> torch.Tensor:
            return (self.scratch_model.predict(batch.noisy, batch.t, encoding) - target).pow(2).mean()
        return loss

    def outer_loss(self, session: TrainingSession) -> Callable[[], torch.Tensor]:
        """The method's loss on the scratch copy plus the retain term (module docstring)."""
        retain = session.retain_batch()
        encoding = session.encode(retain.prompts)
        with torch.no_grad():
            kept = session.frozen.predict(retain.noisy, retain.t, encoding)

        def loss() -> torch.Tensor:
            with session.using(self.scratch_model):
                value = session.objective(session)
            if self.config.retain_weight:
                drift = (self.scratch_model.predict(retain.noisy, retain.t, encoding) - kept).pow(2).mean()
                value = value + self.config.retain_weight * drift
            return value
        return loss

    def simulates(self, session: TrainingSession) -> bool:
        return self.config.weight > 0 and session.step % self.config.every == 0
