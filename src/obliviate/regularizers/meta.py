"""Meta-Unlearning (Gao et al., ICCV 2025), first order: on top of the method's loss L(theta),

    L_meta = L_outer(theta_FT),   theta_FT = k steps of fine-tuning theta on the target's images,

where L_outer is the method's loss plus ``retain_weight`` x retained-prediction drift, measured on
the fine-tuned copy (``defence.py``). First order: the gradient added to theta's is
grad L_outer(theta_FT), the Jacobian of the k steps taken as the identity, as in the reference
code. The attacker's recipe (learning rate, steps, optimizer) is drawn per simulation from the
configured choices, so the defence is not fitted to one attack.

Where we differ from the paper: its outer term maximises the fine-tuned copy's denoising loss on
the concept and lets related concepts "self-destruct"; here the fine-tuned copy must satisfy the
method's own erasure objective and keep retained prompts, which is bounded and keeps utility.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training import FineTuneDistribution, first_order_meta_gradient, linear_surrogate
from .base import register_regularizer
from .defence import DefenceConfig, FineTuningDefence


@dataclass
class MetaConfig(DefenceConfig, FineTuneDistribution):
    def __post_init__(self):
        DefenceConfig.__post_init__(self)
        FineTuneDistribution.__post_init__(self)


@register_regularizer
class MetaUnlearning(FineTuningDefence):
    name = "meta"
    description = "Meta-Unlearning: the method's loss must still hold after simulated fine-tuning on the target (first order)"
    config_class = MetaConfig

    def penalty(self, session):
        if not self.simulates(session):
            return None
        learning_rate, steps, optimizer = self.config.draw(session.rng)
        gradient = first_order_meta_gradient(self.scratch, self.current_weights(session), self.attacker_params,
                                             self.attacker_loss(session), self.outer_loss(session), list(session.params),
                                             steps, optimizer, learning_rate)
        session.counter.count_backward(steps + 1)
        return self.config.weight * linear_surrogate(session.params, gradient)
