"""LML's Levenberg-Marquardt-corrected step (ICCV 2025), as diffusers schedulers: DDIM's
(``ddim-lml``, the released form) and DPM-Solver++'s (``dpm-lml``).

Per step, with the model's noise estimate e (per image, flattened) and a running average of the
estimates along the trajectory,

    a  = momentum * a_prev + (1 - momentum) * e          (a = e at the first step)
    e' = e - a <e, a> / (damping + |a|^2)                 (Sherman-Morrison on the damped rank-1
                                                          Gauss-Newton Hessian a a^T + damping I)
    e' = e' |e| / |e'|                                    (keep the step's length)

and only DDIM's direction towards x_t uses e': x_prev = sqrt(abar_prev) x0_hat(e) + sqrt(1 - abar_prev) e'.
With momentum 0 (the released default) a = e, so e' is e scaled and the rescale restores it: the
step is plain DDIM. Use momentum in (0, 1).

DPM-Solver++ writes x_t = alpha_t x0 + sigma_t e and steps x_next = (sigma_next / sigma_t) x_t +
(terms in x0 estimates), so the noise estimate's share of the step is sigma_next e; ``dpm-lml``
replaces it by sigma_next e', adding sigma_next (e' - e) to the solver's step and leaving its x0
estimates (and the multistep history built from them) as they are. At first order DPM-Solver++ is
DDIM, and ``dpm-lml`` is ``ddim-lml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput


@dataclass(frozen=True)
class LMLOptions:
    damping: float = field(default=1e-3, metadata={"help": "lambda, Levenberg-Marquardt damping", "range": (1e-12, 1e6)})
    momentum: float = field(default=0.5, metadata={"help": "kappa, weight of the running average (0 = plain DDIM)",
                                                   "range": (0.0, 1.0)})


class _LMLCorrection:
    """The running average and LML's corrected noise e' (module docstring); ``options`` holds
    damping and momentum. A scheduler adds ``sigma_next (e' - e)`` to its own step."""

    options_class = LMLOptions
    options = LMLOptions()

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self._average = None

    def corrected_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """e' for this step's estimate ``eps``; updates the running average."""
        kappa, damping = self.options.momentum, self.options.damping
        estimate = eps.double()  # e' is e minus nearly all of itself when a ~ e: float32 would lose it
        average = estimate if self._average is None else kappa * self._average + (1 - kappa) * estimate
        self._average = average
        dims = tuple(range(1, eps.ndim))
        inner = (estimate * average).sum(dims, keepdim=True)
        corrected = estimate - average * inner / (damping + (average * average).sum(dims, keepdim=True))
        length = lambda x: x.pow(2).sum(dims, keepdim=True).sqrt()  # noqa: E731
        return (corrected * length(estimate) / length(corrected).clamp_min(1e-300)).to(eps.dtype)

    def _noise(self, model_output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """The noise estimate e, whatever the model predicts."""
        if self.config.prediction_type == "v_prediction":
            return abar.sqrt() * model_output + (1 - abar).sqrt() * sample
        if self.config.prediction_type != "epsilon":
            raise ValueError(f"LML corrects noise estimates; prediction type {self.config.prediction_type!r} is not supported.")
        return model_output


class LMLScheduler(_LMLCorrection, DDIMScheduler):
    """DDIM with LML's corrected direction: ``ddim-lml``."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, **kwargs):
        if eta:
            raise ValueError("LML corrects the deterministic DDIM step; use eta=0.")
        plain = super().step(model_output, timestep, sample, eta=0.0, **kwargs)
        previous = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        eps = self._noise(model_output, sample, self.alphas_cumprod[timestep])
        prev = plain.prev_sample + (1 - abar_prev).sqrt() * (self.corrected_noise(eps) - eps)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=plain.pred_original_sample)


class DPMLMLScheduler(_LMLCorrection, DPMSolverMultistepScheduler):
    """DPM-Solver++ (multistep) with LML's corrected noise share: ``dpm-lml``."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        alpha_t, _ = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        _, sigma_next = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        eps = self._noise(model_output, sample, alpha_t**2)
        plain = super().step(model_output, timestep, sample, *args, **kwargs)
        prev = plain.prev_sample + sigma_next.to(sample) * (self.corrected_noise(eps) - eps)
        return SchedulerOutput(prev_sample=prev)
