"""f-divergence unlearning (Novello et al., 2025): the anchor objective generalised from MSE to
any f-divergence.

One reverse-diffusion step is Gaussian with a variance fixed by the schedule, so two models'
steps differ only in their means. With sigma_t^2 = beta_t (DDPM's fixed variance) and the mean
written through the noise estimate, the squared mean gap over the variance is

    D = ||mu_theta - mu*||^2 / sigma_t^2 = beta_t / (alpha_t (1 - abar_t)) ||eps_theta(x_t, c_target) - sg[eps*(x_t, c_anchor)]||^2

(``gap=kernel``, the derivation's timestep-dependent factor; a v-prediction gap is converted by
eps = sqrt(abar) v + ..., which scales it by abar_t). ``gap=constant`` uses
D = scale * mean((f_theta - f*)^2) instead, obliviate's earlier form. For equal-variance
Gaussians every f-divergence is a function of D (``form=closed``):

    kl         D / 2                                   (the usual MSE objective, halved)
    jeffreys   D                                       (KL both ways)
    pearson    exp(D) - 1                              (Pearson chi^2: aggressive, grows as e^D)
    hellinger  1 - exp(-D / 8)                         (squared Hellinger distance: conservative)
    alpha      (1 - exp(-a (1 - a) D / 2)) / (a (1 - a))   (Amari alpha; a -> 1 gives KL)
    js         log 2 - E_z[softplus(d z - d^2 / 2)],  d = sqrt(D), z ~ N(0, 1)
               (Jensen-Shannon reduces to one dimension along the mean gap; the expectation
               uses fixed Gauss-Hermite nodes, so it is exact to ~1e-6 and differentiable)

``form=variational`` estimates the divergence of a general f by its variational bound instead,

    D_f(P || Q) = sup_T  E_P[T] - E_Q[f*(T)],

with a discriminator T trained in turn with the model (a min-max game). Samples of both kernels
are standardised by the anchor's: r_Q = z' and r_P = sqrt(m_t) (f_theta - f*) + z, z, z' ~ N(0, I),
with m_t the gap's factor above (so ||r_P - z||^2 = D); the discriminator also sees x_t, since
the shift depends on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import register_method
from .ablation import ConceptAblation
from ..training import GradientConfig

DIVERGENCES = ("kl", "hellinger", "js", "alpha", "pearson", "jeffreys")
GAPS = ("kernel", "constant")
FORMS = ("closed", "variational")
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(40)  # probabilists' Hermite: weight exp(-z^2/2)
_NODES = torch.tensor(_NODES)
_WEIGHTS = torch.tensor(_WEIGHTS / math.sqrt(2 * math.pi))


def f_divergence(gap: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """Divergence between two equal-variance Gaussians whose squared mean gap over the
    variance is ``gap``."""
    if kind == "kl":
        return gap / 2
    if kind == "jeffreys":
        return gap
    if kind == "pearson":
        return torch.expm1(gap)
    if kind == "hellinger":
        return 1 - torch.exp(-gap / 8)
    if kind == "alpha":
        k = alpha * (1 - alpha)
        return (1 - torch.exp(-k * gap / 2)) / k
    if kind == "js":
        d = gap.clamp(min=0).sqrt()[..., None]
        z, w = _NODES.to(gap), _WEIGHTS.to(gap)
        return math.log(2) - (w * F.softplus(d * z - d ** 2 / 2)).sum(-1)
    raise ValueError(f"Unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}.")


@dataclass(frozen=True)
class VariationalF:
    """An f in the f-GAN parametrisation: the discriminator's raw output v becomes T = output(v)
    (inside the domain of f*), and ``conjugate`` is f*. ``c`` rescales f to c f, whose conjugate
    is c f*(t / c), so the bound matches the closed forms above."""

    output: Callable[[torch.Tensor], torch.Tensor]
    conjugate: Callable[[torch.Tensor], torch.Tensor]
    c: float = 1.0

    def bound(self, on_p: torch.Tensor, on_q: torch.Tensor) -> torch.Tensor:
        """E_P[T] - E_Q[f*(T)] from raw discriminator outputs on samples of P and of Q."""
        t_p, t_q = self.c * self.output(on_p), self.c * self.output(on_q)
        return t_p.mean() - self.c * self.conjugate(t_q / self.c).mean()


VARIATIONAL = {
    "kl": VariationalF(lambda v: v, lambda t: torch.exp(t - 1)),  # f = u log u
    "pearson": VariationalF(lambda v: v, lambda t: t * t / 4 + t),  # f = (u - 1)^2
    # f = (sqrt(u) - 1)^2 / 2, so the divergence is 1 - Bhattacharyya coefficient
    "hellinger": VariationalF(lambda v: 1 - torch.exp(-v), lambda t: t / (1 - t), c=0.5),
    # f = (u log u - (u + 1) log((u + 1) / 2)) / 2: f-GAN's form is twice Jensen-Shannon
    "js": VariationalF(lambda v: math.log(2) - F.softplus(-v), lambda t: -torch.log(2 - torch.exp(t)), c=0.5),
}


class Discriminator(nn.Module):
    """T(r, x_t): a small convolutional net over the standardised kernel sample and the noisy
    latent, pooled to one raw output per image."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2 * channels, width, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, r: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(torch.cat([r, x_t], 1)).mean(dim=(2, 3))).squeeze(1)


@dataclass
class FDivConfig(GradientConfig):
    divergence: str = field(default="hellinger", metadata={"help": f"one of {', '.join(DIVERGENCES)}"})
    alpha: float = field(default=0.5, metadata={"help": "order of the alpha-divergence, in (0, 1)"})
    gap: str = field(default="kernel", metadata={
        "help": "kernel: the reverse kernels' timestep-dependent gap (the derivation); constant: scale x MSE"})
    scale: float = field(default=10.0, metadata={"help": "gap=constant: multiplies the mean squared gap"})
    form: str = field(default="closed", metadata={
        "help": "closed: the Gaussian closed form; variational: a discriminator's bound (kl, pearson, hellinger, js)"})
    discriminator_learning_rate: float = field(default=1e-3, metadata={"help": "form=variational: Adam learning rate of T"})
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate"})

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"Unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
        if self.gap not in GAPS:
            raise ValueError(f"gap must be one of {', '.join(GAPS)}, got {self.gap!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form == "variational" and self.divergence not in VARIATIONAL:
            raise ValueError(f"form=variational covers {', '.join(VARIATIONAL)}; {self.divergence!r} has only its closed form.")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.scale <= 0 or self.discriminator_learning_rate <= 0:
            raise ValueError("scale and discriminator_learning_rate must be positive")
        super().__post_init__()


@register_method
class FDivergence(ConceptAblation):
    """Concept ablation's objective with the MSE replaced by an f-divergence."""

    name = "fdiv"
    description = "anchor objective under an f-divergence (kl = MSE, jeffreys, pearson, hellinger, js, alpha; closed or variational)"
    config_class = FDivConfig

    def setup(self, session) -> None:
        super().setup(session)
        if self.config.form == "variational":
            channels = session.model.unet.config.in_channels
            self.discriminator = Discriminator(channels).to(session.model.device)
            self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(),
                                                            lr=self.config.discriminator_learning_rate)

    def gap_multiplier(self, session, t: torch.Tensor, elements: int) -> torch.Tensor:
        """m_t with D = m_t * ||f_theta - f*||^2 (summed over elements), per sample."""
        if self.config.gap == "constant":
            return torch.full(t.shape, self.config.scale / elements, device=t.device)
        scheduler = session.model.scheduler
        abar = scheduler.alphas_cumprod.to(t.device)[t]
        beta = scheduler.betas.to(t.device)[t]
        factor = beta / ((1 - beta) * (1 - abar))
        return factor * abar if scheduler.config.prediction_type == "v_prediction" else factor

    def loss(self, session) -> torch.Tensor:
        prediction, target, batch = self.prediction_and_target(session)
        difference = prediction - target
        multiplier = self.gap_multiplier(session, batch.t, difference[0].numel()).view(-1, *[1] * (difference.ndim - 1))
        if self.config.form == "closed":
            gap = (multiplier * difference.pow(2)).flatten(1).sum(1)
            return f_divergence(gap, self.config.divergence, self.config.alpha).mean()
        return self._variational(session, multiplier.sqrt() * difference, batch.noisy)

    def _variational(self, session, shift: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """One ascent step of the discriminator on the bound, then the bound for the model."""
        f = VARIATIONAL[self.config.divergence]
        noise = torch.randn((2, *shift.shape), generator=session.generator).to(shift)
        r_p, r_q = shift + noise[0], noise[1]
        with torch.enable_grad():  # regularizers may score the objective without a graph
            self.discriminator.requires_grad_(True)
            ascent = -f.bound(self.discriminator(r_p.detach(), x_t), self.discriminator(r_q, x_t))
            self.discriminator_optimizer.zero_grad()
            ascent.backward()
            self.discriminator_optimizer.step()
            self.discriminator.requires_grad_(False)  # the model's step must not move T
        return f.bound(self.discriminator(r_p, x_t), self.discriminator(r_q, x_t))
