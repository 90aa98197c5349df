"""How likely a model finds images: bits per dimension through the probability-flow ODE, a
measure of forgetting that needs no judge (a concept the model forgot should become unlikely, as
it is for the retrain oracle).

In y = x / alpha and s = sigma / alpha the ODE is dy/ds = eps_hat(x, t), and along it
d log p(y) / ds = -div_y = -alpha tr(d eps_hat / dx) (alpha sigma times the diffusion-Fisher
trace, ``models.fisher``). So, from the data (t = 0) to the step where s reaches ``S_MAX``,

    log p(y_0) = log N(y_N; 0, (1 + s_N^2) I) + integral alpha tr(J_eps) ds,

integrated with Heun's method on timesteps spaced evenly in log s, the trace by Hutchinson's estimate with
one Rademacher vector per image held along the path. For a latent-diffusion model the density
is of the VAE latents.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..models.fisher import forward_mode_attention

# Where the path ends: at s = 100 the data's spread (~1) is lost in the noise, and the prior
# N(0, 1 + s^2) errs by about Var(data) / (2 s^2) = 1e-4 nats per dimension. Going on to the last
# training step would cross the cosine schedule's final jump (s from ~600 to 2e4) in one step.
S_MAX = 100.0


def log_likelihood(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                   steps: int = 50, seed: int = 0) -> torch.Tensor:
    """log p(x0) per batch element under the ODE of ``eps_fn(x, t)`` (t an integer timestep)."""
    abar = alphas_cumprod.double()
    every_s = ((1 - abar) / abar).sqrt()  # increasing in t
    last = int(torch.searchsorted(every_s, torch.tensor(S_MAX, dtype=torch.float64)).clamp(max=len(abar) - 1))
    # spaced evenly in log s (the log signal-to-noise ratio), where the path changes evenly
    targets = torch.logspace(math.log10(every_s[0]), math.log10(every_s[last]), steps + 1, dtype=torch.float64)
    timesteps = torch.searchsorted(every_s, targets).clamp(max=last).unique().tolist()
    steps = len(timesteps) - 1
    alpha, sigma = abar[timesteps].sqrt(), (1 - abar[timesteps]).sqrt()
    s = sigma / alpha
    probe = (torch.randint(0, 2, x0.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).double()

    def velocity_and_divergence(y, k):
        eps, jz = torch.func.jvp(lambda x: eps_fn(x, timesteps[k]).double(), (alpha[k] * y,), (probe,))
        return eps, alpha[k] * (probe * jz).flatten(1).sum(1)

    y = x0.double() / alpha[0]
    change = torch.zeros(len(y), dtype=torch.float64)
    v, div = velocity_and_divergence(y, 0)
    for k in range(steps):
        h = s[k + 1] - s[k]
        v_guess, div_guess = velocity_and_divergence(y + h * v, k + 1)
        y = y + h * (v + v_guess) / 2
        change += h * (div + div_guess) / 2
        v, div = velocity_and_divergence(y, k + 1)
    d = y[0].numel()
    variance = 1 + s[-1] ** 2
    log_prior = -0.5 * (y.flatten(1) ** 2).sum(1) / variance - 0.5 * d * math.log(2 * math.pi * variance)
    return log_prior + change - d * math.log(alpha[0])  # x_0 = alpha_0 y_0


@torch.no_grad()
def bits_per_dim(model, images: torch.Tensor, prompts: list[str], steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Per image in [0, 1]: -log2 P / dimensions of the 256-level image under ``model``
    conditioned on ``prompts`` (no classifier-free guidance: guided sampling has no density).
    Images are dequantised with uniform noise within their levels."""
    dequantised = (images * 255 + torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))) / 256
    x0 = model.to_latents(dequantised)
    encoding = model.encode(prompts)

    def eps_fn(x, t):
        return model.noise_prediction(x.float(), torch.full((len(x),), t, device=x.device), encoding)

    with forward_mode_attention(model.unet):  # forward mode needs no autograd graph: memory stays flat
        log_density = log_likelihood(eps_fn, x0, model.scheduler.alphas_cumprod, steps, seed)
    d = x0[0].numel()
    return (-log_density / d - math.log(2 / 256)) / math.log(2)  # latents in [-1, 1]: bins of width 2/256
