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
With ``retain_weight`` the regularizer adds AEGIS's data-free retain term

    retain_weight * 1/2 * mean (theta - theta_0)^2      (theta_0: the weights at the request's start)

and with ``rectify`` that term's gradient g_r is rectified against the rest of the step's gradient
g_e (the method's loss and every penalty) whenever the two conflict (<g_e, g_r> < 0): it is scaled
to lambda g_r, lambda = -omega <g_e, g_r> / |g_r|^2, so that the step no longer moves against the
retain term (to first order) once omega, ramped linearly from 0 to 1 over the request's steps,
reaches 1 (``training.rectified_retain_gradient``). Unlike a penalty, the rectified term depends
on everyone else's gradient, so it enters the loop through the contract's ``rectify`` role.
AEGIS updates its adversarial embedding by signed gradient steps; here the adversary uses Adam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..models.text import TextEncoding
from ..training import rectified_retain_gradient
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
    retain_weight: float = field(default=0.0, metadata={
        "help": "weight of AEGIS's data-free retain term, 1/2 mean (theta - theta_request_start)^2 (0: none)"})
    rectify: bool = field(default=False, metadata={
        "help": "AEGIS's gradient rectification: where the retain term's gradient conflicts with the rest of the "
                "step's, scale it so the step stops working against it (ramped in over the request)"})

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if min(self.tokens, self.inner_steps, self.every) <= 0:
            raise ValueError("tokens, inner_steps and every must be positive")
        if self.inner_learning_rate <= 0:
            raise ValueError(f"inner_learning_rate must be positive, got {self.inner_learning_rate}")
        if self.objective not in ("anchor", "method"):
            raise ValueError(f"objective must be 'anchor' or 'method', got {self.objective!r}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        if self.rectify and not self.retain_weight:
            raise ValueError("rectify rescales the retain term's gradient, and retain_weight is 0; "
                             "give retain_weight > 0 (e.g. adversarial:retain_weight=100,rectify=true)")


@register_regularizer
class AdversarialErasure(Regularizer):
    name = "adversarial"
    description = "AdvUnlearn: an inner soft-prompt attacker revives the target, the outer step erases that prompt too"
    config_class = AdversarialConfig
    rewrites_gradient = True  # with retain_weight: the retain term enters through ``rectify``

    def setup(self, session) -> None:
        retained = session.params if self.config.retain_weight else {}
        self.request_start = {n: p.detach().clone() for n, p in retained.items()}
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

    def rectify(self, session) -> None:
        """Add the retain term's gradient, rectified against the rest of the step's (module docstring)."""
        if not self.request_start:
            return
        params = session.params
        gradients = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        count = sum(w.numel() for w in self.request_start.values())
        retain = {n: self.config.retain_weight / count * (params[n].detach() - w) for n, w in self.request_start.items()}
        if self.config.rectify:
            retain = rectified_retain_gradient(gradients, retain, (session.step + 1) / session.config.steps)
        for n, p in params.items():
            p.grad = gradients[n] + retain[n]
