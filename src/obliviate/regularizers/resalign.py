"""ResAlign (NeurIPS 2025): make the erasure hold after fine-tuning by differentiating through a
model of fine-tuning. On top of the method's loss L(theta) it adds ``weight`` x L_outer(theta*),

    theta*(theta) = argmin_u L_FT(u) + |u - theta|^2 / (2 gamma)    (fine-tuning as a Moreau envelope),

whose exact hypergradient is (I + gamma H)^-1 grad L_outer(theta*), H the Hessian of the
attacker's loss L_FT at theta*; it is solved with a few Richardson iterations of Hessian-vector
products (``training.simulation.moreau_hypergradient``). gamma plays the part of the attacker's
budget (learning rate x steps) and is drawn per simulation from ``gammas``, standing in for the
paper's sampled fine-tuning configurations. L_outer is the method's loss plus retained-prediction
drift on the fine-tuned copy (``defence.py``).

Where we differ from the paper: the paper weighs beta [L(theta*) - L(theta)]; we add
``weight`` x L(theta*) to the method's loss, so the erasure now is never traded for the erasure
after fine-tuning. Hessian-vector products are central differences of gradients (no double
backward through the UNet's attention kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training import linear_surrogate, moreau_hypergradient
from .base import register_regularizer
from .defence import DefenceConfig, FineTuningDefence


@dataclass
class ResAlignConfig(DefenceConfig):
    gammas: tuple[float, ...] = field(default=(1e-3, 3e-3), metadata={
        "help": "proximal strengths of simulated fine-tuning (about learning rate x steps), one drawn per simulation"})
    prox_steps: int = field(default=4, metadata={"help": "SGD steps (lr gamma/2) that approximate theta*"})
    iterations: int = field(default=3, metadata={"help": "Richardson iterations (Hessian-vector products)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.gammas or min(self.gammas) <= 0:
            raise ValueError(f"gammas must be positive values, got {self.gammas}")
        if self.prox_steps <= 0 or self.iterations < 0:
            raise ValueError("prox_steps must be positive and iterations >= 0")


@register_regularizer
class ResAlign(FineTuningDefence):
    name = "resalign"
    description = "ResAlign: hypergradient through fine-tuning modelled as a Moreau envelope (Richardson HVPs)"
    config_class = ResAlignConfig

    def setup(self, session) -> None:
        super().setup(session)
        left_out = sorted(set(session.params) - set(self.attacker_params))
        if left_out:
            raise ValueError(f"resalign differentiates through the attacker's fine-tuning, so the attacker must train "
                             f"every parameter the method trains; attacker_trains={self.config.attacker_trains!r} "
                             f"leaves out {left_out[0]!r}.")

    def penalty(self, session):
        if not self.simulates(session):
            return None
        cfg = self.config
        gamma = float(cfg.gammas[session.rng.integers(len(cfg.gammas))])
        trained = list(session.params)
        gradient = moreau_hypergradient(self.scratch, self.current_weights(session), self.attacker_params,
                                        self.attacker_loss(session), self.outer_loss(session), gamma,
                                        cfg.prox_steps, gamma / 2, cfg.iterations)
        session.counter.count_backward(cfg.prox_steps + 1 + 2 * cfg.iterations)
        return cfg.weight * linear_surrogate(session.params, {n: gradient[n] for n in trained})
