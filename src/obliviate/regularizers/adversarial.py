"""Adversarial unlearning (AdvUnlearn, Zhang et al. NeurIPS 2024; AEGIS's learnable erase target):
erase not only the target's prompts but the strongest soft prompt an attacker can find for it.

An inner attacker learns k soft states delta which, placed after the first token of the target
prompts' token states, make the trained model predict what the frozen model predicts for the
target (it draws the concept again):

    delta <- argmin_delta || f_theta(x_t, [delta; c], t) - sg f*(x_t, c, t) ||^2

``inner_steps`` Adam updates per outer step, warm-started across steps (a persistent adversary).
The outer step then adds

    weight * || f_theta(x_t, [delta; c], t) - sg f*(x_t, c_anchor, t) ||^2

so the attacked prompt draws the anchor as well. With ``objective="method"`` the outer step is
instead the method's own loss with delta placed in every prompt it encodes (a method whose target
does not depend on the prompt, like ``safegen``'s, then erases the concept under the adversary's
prompt too). The adversary lives in the token-state space the
UNet reads, which holds everything a word-embedding attack can reach; the evaluation's prompt
attack instead optimises the input word embeddings of 5 prefix tokens. x_t comes from the frozen
model's images of the targets (``TrainingSession.concept_batch``), never the attacks' renders.
Not implemented: AEGIS's conflict-gated rectification of the retain gradient (the loop sums
gradients; a retain term comes from a penalty such as ``l2sp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..models.text import TextEncoding
from .base import Regularizer, register_regularizer


@dataclass
class AdversarialConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of erasing the adversarial prompt"})
    tokens: int = field(default=1, metadata={"help": "k, soft states the adversary learns (AdvUnlearn: 1)"})
    inner_steps: int = field(default=3, metadata={"help": "adversary updates per outer step"})
    inner_learning_rate: float = field(default=1e-2, metadata={"help": "the adversary's Adam learning rate"})
    every: int = field(default=1, metadata={"help": "attack and erase on every n-th optimizer step (cost)"})
    objective: Literal["anchor", "method"] = field(default="anchor", metadata={
        "help": "the outer loss on the attacked prompt: 'anchor' (draw the frozen model's anchor) or 'method' "
                "(the method's own loss with the adversary's states in every prompt)"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if min(self.tokens, self.inner_steps, self.every) <= 0:
            raise ValueError("tokens, inner_steps and every must be positive")
        if self.inner_learning_rate <= 0:
            raise ValueError(f"inner_learning_rate must be positive, got {self.inner_learning_rate}")
        if self.objective not in ("anchor", "method"):
            raise ValueError(f"objective must be 'anchor' or 'method', got {self.objective!r}")


@register_regularizer
class AdversarialErasure(Regularizer):
    name = "adversarial"
    description = "AdvUnlearn: an inner soft-prompt attacker revives the target, the outer step erases that prompt too"
    config_class = AdversarialConfig

    def setup(self, session) -> None:
        session.concept_batch()  # the frozen model's images, drawn before training moves anything
        start = session.encode(["a"]).states[0, 1].detach()  # a filler word's state, as attacks start
        self.prefix = start.expand(self.config.tokens, -1).clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.prefix], lr=self.config.inner_learning_rate)

    def attack(self, session, batch, prompt: TextEncoding, revived: torch.Tensor) -> None:
        """``inner_steps`` updates of the adversary against the current weights."""
        for _ in range(self.config.inner_steps):
            loss = (session.model.predict(batch.noisy, batch.t, prompt.with_prefix(self.prefix)) - revived).pow(2).mean()
            (self.prefix.grad,) = torch.autograd.grad(loss, [self.prefix])
            self.optimizer.step()
            session.counter.count_backward()
        self.prefix.grad = None

    def penalty(self, session):
        if not self.config.weight or session.step % self.config.every:
            return None
        batch = session.concept_batch()
        prompt, anchor = session.encode(batch.prompts), session.encode(batch.anchors)
        with torch.no_grad():
            noisy, t = torch.cat([batch.noisy, batch.noisy]), torch.cat([batch.t, batch.t])
            revived, erased = session.frozen.predict(noisy, t, TextEncoding.cat([prompt, anchor])).chunk(2)
        self.attack(session, batch, prompt, revived)
        if self.config.objective == "method":
            with session.prefixed(self.prefix.detach()):
                return self.config.weight * session.objective(session)
        attacked = prompt.with_prefix(self.prefix.detach())
        return self.config.weight * (session.model.predict(batch.noisy, batch.t, attacked) - erased).pow(2).mean()
