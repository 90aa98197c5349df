"""Simulated fine-tuning: what a defence against relearning needs to ask "what would this model
look like after an attacker fine-tuned it?" and how that answer moves with the weights.

A ``ScratchModule`` is a second copy of the trained network, reloaded from the current weights
before each simulation, so the model under training is never touched. Two gradients are built on
it:

- ``first_order_meta_gradient`` (Meta-Unlearning, first order): fine-tune the copy for k steps,
  theta_FT = FT_k(theta), and return grad L_outer(theta_FT), standing in for
  d L_outer(FT_k(theta)) / d theta with the Jacobian of FT_k taken as the identity;
- ``moreau_hypergradient`` (ResAlign): fine-tuning modelled as the proximal point
  theta* = argmin_u L_FT(u) + |u - theta|^2 / (2 gamma). Its Jacobian is (I + gamma H)^-1 with H the
  Hessian of L_FT at theta*, so

      d L_outer(theta*) / d theta = (I + gamma H)^-1 b,   b = grad L_outer(theta*),

  solved by the Richardson iteration x <- b - gamma H x (converges when gamma |H| < 1), each
  Hessian-vector product a central difference of two gradients.

Both return plain tensors; ``linear_surrogate`` turns them into a loss term whose value is zero
and whose gradient is the given tensor, so the gradient loop adds them like any penalty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class ScratchModule:
    """A copy of ``module`` (same class and shapes) whose weights are overwritten from a
    ``{name: tensor}`` dict before each use; forward hooks of the original are not copied."""

    def __init__(self, module: torch.nn.Module):
        hooks = module._forward_hooks
        module._forward_hooks = type(hooks)()  # counters watching the original must not see the copy
        try:
            self.module = copy.deepcopy(module)
        finally:
            module._forward_hooks = hooks
        self.module.requires_grad_(False)
        self.parameters = dict(self.module.named_parameters())

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        for name, value in weights.items():
            self.parameters[name].copy_(value)

    def train_only(self, names: Sequence[str]) -> list[torch.nn.Parameter]:
        """Gradients flow to ``names`` only; returns those parameters."""
        self.module.requires_grad_(False)
        chosen = [self.parameters[n] for n in names]
        for p in chosen:
            p.requires_grad_(True)
        return chosen


def finetune(scratch: ScratchModule, trainable: Sequence[str], loss: Callable[[], torch.Tensor], steps: int,
             optimizer: str, learning_rate: float, proximal: float = 0.0) -> None:
    """``steps`` optimizer steps of ``loss()`` on the scratch copy's ``trainable`` parameters;
    ``proximal`` > 0 adds |u - u_0|^2 / (2 * proximal) (the Moreau envelope's pull to the start)."""
    params = scratch.train_only(trainable)
    start = [p.detach().clone() for p in params] if proximal else []
    opt = OPTIMIZERS[optimizer](params, lr=learning_rate)
    for _ in range(steps):
        value = loss()
        if proximal:
            value = value + sum((p - s).pow(2).sum() for p, s in zip(params, start)) / (2 * proximal)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    for p in params:
        p.grad = None


def gradient_at(scratch: ScratchModule, names: Sequence[str], loss: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """grad of ``loss()`` with respect to the scratch copy's ``names`` (zeros where it does not reach)."""
    params = scratch.train_only(names)
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for n, p, g in zip(names, params, grads)}


def first_order_meta_gradient(scratch: ScratchModule, weights: dict[str, torch.Tensor], trainable: Sequence[str],
                              finetune_loss: Callable[[], torch.Tensor], outer_loss: Callable[[], torch.Tensor],
                              wrt: Sequence[str], steps: int, optimizer: str, learning_rate: float) -> dict[str, torch.Tensor]:
    """grad L_outer at theta_FT (the copy after ``steps`` fine-tuning steps from ``weights``),
    with respect to the parameters ``wrt``."""
    scratch.load(weights)
    finetune(scratch, trainable, finetune_loss, steps, optimizer, learning_rate)
    return gradient_at(scratch, wrt, outer_loss)


def moreau_hypergradient(scratch: ScratchModule, weights: dict[str, torch.Tensor], trainable: Sequence[str],
                         finetune_loss: Callable[[], torch.Tensor], outer_loss: Callable[[], torch.Tensor],
                         gamma: float, steps: int, learning_rate: float, iterations: int,
                         epsilon: float = 1e-3) -> dict[str, torch.Tensor]:
    """(I + gamma H)^-1 grad L_outer(theta*) over the ``trainable`` parameters (see the module
    docstring); theta* is approximated by ``steps`` SGD steps on the proximal objective from
    ``weights``. ``finetune_loss`` must draw the same batch on every call (fixed data and
    noise), or the central differences measure noise. ``epsilon`` is the difference step
    relative to |x| / |theta*|."""
    scratch.load(weights)
    finetune(scratch, trainable, finetune_loss, steps, "sgd", learning_rate, proximal=gamma)
    names = list(trainable)
    b = gradient_at(scratch, names, outer_loss)
    optimum = {n: scratch.parameters[n].detach().clone() for n in names}
    scale = float(torch.sqrt(sum(v.double().pow(2).sum() for v in optimum.values()))) or 1.0

    def hessian_vector(vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in vector.values())))
        if norm == 0.0:
            return {n: torch.zeros_like(v) for n, v in vector.items()}
        step = epsilon * scale / norm
        scratch.load({n: optimum[n] + step * vector[n] for n in names})
        plus = gradient_at(scratch, names, finetune_loss)
        scratch.load({n: optimum[n] - step * vector[n] for n in names})
        minus = gradient_at(scratch, names, finetune_loss)
        return {n: (plus[n] - minus[n]) / (2 * step) for n in names}

    x = dict(b)
    for _ in range(iterations):
        hx = hessian_vector(x)
        x = {n: b[n] - gamma * hx[n] for n in names}
    scratch.load(optimum)
    return x


def linear_surrogate(params: dict[str, torch.nn.Parameter], gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_n <g_n, theta_n - sg(theta_n)>: zero in value, ``gradients`` as its gradient."""
    terms = [(gradients[n].to(p) * (p - p.detach())).sum() for n, p in params.items() if n in gradients]
    if not terms:
        raise ValueError("None of the trained parameters received a simulated gradient.")
    return torch.stack(terms).sum()


@dataclass
class FineTuneDistribution:
    """The fine-tuning recipes a defence simulates, one drawn per simulation (ResAlign samples
    its attacker's configuration per step, so the defence is not tuned to one recipe)."""

    learning_rates: tuple[float, ...] = field(default=(3e-4, 1e-3), metadata={"help": "simulated attacker's learning rates"})
    steps: tuple[int, ...] = field(default=(1, 2), metadata={"help": "simulated fine-tuning step counts"})
    optimizers: tuple[str, ...] = field(default=("adam",), metadata={"help": "simulated optimizers (adam, sgd)"})

    def __post_init__(self):
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates must be positive values, got {self.learning_rates}")
        if not self.steps or min(self.steps) <= 0:
            raise ValueError(f"steps must be positive step counts, got {self.steps}")
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if not self.optimizers or unknown:
            raise ValueError(f"optimizers must name some of {', '.join(OPTIMIZERS)}, got {self.optimizers}")

    def draw(self, rng: np.random.Generator) -> tuple[float, int, str]:
        """(learning rate, steps, optimizer) of one simulated attack."""
        return (float(self.learning_rates[rng.integers(len(self.learning_rates))]),
                int(self.steps[rng.integers(len(self.steps))]), str(self.optimizers[rng.integers(len(self.optimizers))]))
