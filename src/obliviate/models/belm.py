"""BELM, the exactly invertible samplers of Wang et al. (NeurIPS 2024), as diffusers schedulers:
O-BELM (``o-belm``) and the family's members with a fixed weight (``belm:a=...``).

On a grid of N sampling steps from clean (i = 0, alpha_0 = 1, sigma_0 = 0) to noise (i = N), with
alpha_i = sqrt(abar(t_i)), sigma_i = sqrt(1 - abar(t_i)), write y_i = x_i / alpha_i and
s_i = sigma_i / alpha_i. The probability-flow ODE is then dy/ds = eps(x, t). O-BELM ties three
consecutive states together linearly, with h_i = s_i - s_{i-1}:

    y_{i-1} = a_i y_{i+1} + (1 - a_i) y_i + c_i eps(x_i, t_i),
    a_i = h_i^2 / h_{i+1}^2,    c_i = -h_i (h_i + h_{i+1}) / h_{i+1},

the member of the BELM family with the least local truncation error (exact while eps is linear in
s). Generation reads the relation downwards; inversion solves the same relation for y_{i+1}:

    y_{i+1} = (y_{i-1} - (1 - a_i) y_i - c_i eps(x_i, t_i)) / a_i,

so an image inverted to noise regenerates to itself up to rounding, with classifier-free guidance
too (the same guided eps both ways). The steps with no third state are DDIM:
y_j = y_i + (s_j - s_i) eps. A v-prediction output v becomes eps = sigma x + alpha v.

Any other weight a != 0 gives an exactly invertible member too: expanding y_{i-1} and y_{i+1}
around s_i, the relation is consistent (first order) when c_i = -(h_i + a h_{i+1}). ``belm:a=1``
is the symmetric form y_{i-1} = y_{i+1} - (h_i + h_{i+1}) eps (BDIA's leapfrog), whose parasitic
solution neither grows nor shrinks; a fixed a != 1 multiplies rounding by up to max(a, 1/a)^N over
a round trip (measured at 32 steps: a = 0.5 returns the image to 1e-9, a = 2 to 6e-5, a = 1 to
1e-13, in float64), so ``belm`` defaults to a = 1. O-BELM's a_i = h_i^2 / h_{i+1}^2 is the member
that is second order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


class OBELMScheduler(SchedulerMixin, ConfigMixin):
    """Built from a DDPM scheduler's config (``OBELMScheduler.from_config(model.scheduler.config)``).
    Timesteps are spaced to end at the last training step ("trailing"), so the first state is
    pure noise. ``step`` generates, remembering the state before; ``invert_step`` runs the other
    way (``T2IModel.invert`` drives it)."""

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"BELM needs epsilon or v_prediction outputs, not {prediction_type!r}.")
        ddpm = DDPMScheduler(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas_cumprod = ddpm.alphas_cumprod.double()
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"BELM takes 1 to {total} steps, got {num_inference_steps}.")
        self.num_inference_steps = num_inference_steps
        ascending = torch.round(torch.arange(1, num_inference_steps + 1, dtype=torch.float64) * total / num_inference_steps) - 1
        abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[ascending.long()]])
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()  # index i = 0 (clean) .. N (noise)
        self.s = self.sigma / self.alpha
        self.timesteps = ascending.long().flip(0).to(device)  # t_N, ..., t_1
        self._upper = None  # x_{i+1} while generating

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def index(self, timestep) -> int:
        """The grid index i of ``timestep`` (t_i)."""
        matches = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"Timestep {int(timestep)} is not on this scheduler's grid; call set_timesteps first.")
        return self.num_inference_steps - int(matches[0])

    def epsilon(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "v_prediction":
            return self.sigma[i] * sample.double() + self.alpha[i] * model_output.double()
        return model_output.double()

    def _relation(self, i: int) -> tuple[float, float]:
        """(a_i, c_i) of the three-state relation at grid index ``i``."""
        return self._coefficients(self.s[i] - self.s[i - 1], self.s[i + 1] - self.s[i])

    def _coefficients(self, h_i, h_up) -> tuple[float, float]:
        return h_i**2 / h_up**2, -h_i * (h_i + h_up) / h_up

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        """x_{i-1} from x_i (``sample``), its model output and the state generated before it."""
        i = self.index(timestep)
        eps, y = self.epsilon(model_output, i, sample), sample.double() / self.alpha[i]
        if self._upper is None or i == self.num_inference_steps:
            y_down = y + (self.s[i - 1] - self.s[i]) * eps
        else:
            a, c = self._relation(i)
            y_down = a * self._upper.double() / self.alpha[i + 1] + (1 - a) * y + c * eps
        self._upper = sample
        prev = (self.alpha[i - 1] * y_down).to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def resume(self, upper: torch.Tensor) -> None:
        """Continue generation below an inverted pair: ``upper`` is x_N, and the next ``step``
        is called with x_{N-1} at ``timesteps[1]``."""
        self._upper = upper

    def invert_step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor,
                    lower: torch.Tensor | None) -> torch.Tensor:
        """x_{i+1} from x_i (``sample``), its model output at t_i (t_1 for the clean image,
        i = 0) and x_{i-1} (``lower``; None for the DDIM first step)."""
        eps = self.epsilon(model_output, max(i, 1), sample)
        y = sample.double() / self.alpha[i]
        if lower is None:
            y_up = y + (self.s[i + 1] - self.s[i]) * eps
        else:
            a, c = self._relation(i)
            y_up = (lower.double() / self.alpha[i - 1] - (1 - a) * y - c * eps) / a
        return (self.alpha[i + 1] * y_up).to(sample.dtype)


@dataclass(frozen=True)
class BELMOptions:
    a: float = field(default=1.0, metadata={"help": "weight of x_{i+1} in every three-state relation (1: leapfrog)",
                                            "range": (1e-3, 1e3)})


class BELMScheduler(OBELMScheduler):
    """A BELM member with a fixed weight ``options.a`` (module docstring): exactly invertible like
    O-BELM, first order where O-BELM is second."""

    options_class = BELMOptions
    options = BELMOptions()

    def _coefficients(self, h_i, h_up) -> tuple[float, float]:
        return self.options.a, -(h_i + self.options.a * h_up)
