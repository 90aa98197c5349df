"""LML's Levenberg-Marquardt-corrected DDIM step (ICCV 2025), as a diffusers scheduler.

Per step, with the model's noise estimate e (per image, flattened) and a running average of the
estimates along the trajectory,

    a  = momentum * a_prev + (1 - momentum) * e          (a = e at the first step)
    e' = e - a <e, a> / (damping + |a|^2)                 (Sherman-Morrison on the damped rank-1
                                                          Gauss-Newton Hessian a a^T + damping I)
    e' = e' |e| / |e'|                                    (keep the step's length)

and only DDIM's direction towards x_t uses e': x_prev = sqrt(abar_prev) x0_hat(e) + sqrt(1 - abar_prev) e'.
With momentum 0 (the released default) a = e, so e' is e scaled and the rescale restores it: the
step is plain DDIM. Use momentum in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput


@dataclass(frozen=True)
class LMLOptions:
    damping: float = field(default=1e-3, metadata={"help": "lambda, Levenberg-Marquardt damping", "range": (1e-12, 1e6)})
    momentum: float = field(default=0.5, metadata={"help": "kappa, weight of the running average (0 = plain DDIM)",
                                                   "range": (0.0, 1.0)})


class LMLScheduler(DDIMScheduler):
    """DDIM with LML's corrected direction (module docstring); ``options`` holds damping and momentum."""

    options_class = LMLOptions
    options = LMLOptions()

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self._average = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, **kwargs):
        if eta:
            raise ValueError("LML corrects the deterministic DDIM step; use eta=0.")
        plain = super().step(model_output, timestep, sample, eta=0.0, **kwargs)
        abar = self.alphas_cumprod[timestep]
        previous = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        eps = (abar.sqrt() * model_output + (1 - abar).sqrt() * sample
               if self.config.prediction_type == "v_prediction" else model_output)
        corrected = self.corrected_noise(eps)
        prev = plain.prev_sample + (1 - abar_prev).sqrt() * (corrected - eps)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=plain.pred_original_sample)

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
