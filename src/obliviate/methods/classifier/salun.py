"""SalUn (Fan et al., ICLR 2024) for classifiers: a weight-saliency mask from the forget loss's
gradient, then random-label unlearning that only moves the salient weights.

    m = 1[ |sum_{D_f} grad ell_f| in the top ``saliency`` fraction ],  ell_f = -CE,
    theta <- theta - lr * m * grad L_RL

The mask is ranked globally over every trainable tensor, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.nn import functional as F

from ...training import top_fraction_mask
from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod
from .rl import relabel_and_retain_epoch


@dataclass
class SalUnConfig(ClassifierConfig):
    epochs: int = field(default=2, metadata={"help": "random-label passes"})
    saliency: float = field(default=0.5, metadata={"help": "fraction of weights that may change"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.saliency <= 1:
            raise ValueError(f"saliency must lie in (0, 1], got {self.saliency}")


@register_method
class SalUn(ClassifierMethod):
    name = "salun"
    description = "saliency-masked random labels (weights ranked by the forget gradient)"
    config_class = SalUnConfig

    def run(self, session):
        gradient = session.gradients(lambda logits, y: -F.cross_entropy(logits, y, reduction="sum"),
                                     session.forget_x, session.forget_y)
        session.mask = top_fraction_mask({n: g.abs() for n, g in gradient.items()}, self.config.saliency)
        for _ in range(self.config.epochs):
            relabel_and_retain_epoch(session)
        return {}
