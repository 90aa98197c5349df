"""The diffusion Fisher F_t(x) = -grad^2 log q_t(x) of a noise-prediction model, without double
backprop.

For x_t = alpha y + sigma eps, Tweedie's formula gives grad log q_t = -eps_hat(x, t) / sigma and
E[y | x_t] = (x_t - sigma eps_hat) / alpha, so

    F_t = I / sigma^2 - (alpha^2 / sigma^4) Cov[y | x_t]  =  (1 / sigma) d eps_hat / dx,

and a matrix-vector product F_t v is one Jacobian-vector product of the model, (1 / sigma) J v:
one forward-mode pass that carries a tangent, or a central difference of two plain passes, where
autodiff of the score's gradient needs a backward pass through a backward pass. The trace is
Hutchinson's estimate E_z[z^T F_t z] over Rademacher z, one product per probe. For a learned model
J is not exactly symmetric; the trace is the same either way.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor


@contextlib.contextmanager
def forward_mode_attention(unet):
    """Use diffusers' plain attention for the block: PyTorch has no forward-mode derivative for
    its fused CPU attention kernel."""
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


@torch.no_grad()  # neither way needs an autograd graph
def fisher_vector_product(eps_fn, x: torch.Tensor, v: torch.Tensor, sigma: float, method: str = "forward",
                          step: float = 1e-3) -> torch.Tensor:
    """F_t v for ``eps_fn(x)``, the model's noise prediction at the noise level ``sigma``.
    ``method``: "forward" (forward-mode autodiff, exact; needs ``forward_mode_attention``) or
    "difference" (central difference over ``step`` times |x|/|v| per element: two plain passes,
    error O(step^2))."""
    if method == "forward":
        _, jv = torch.func.jvp(eps_fn, (x,), (v,))
        return jv / sigma
    if method == "difference":
        norm = lambda t: t.flatten(1).norm(dim=1).view(-1, *[1] * (t.ndim - 1))  # noqa: E731
        h = step * norm(x) / norm(v).clamp_min(1e-30)
        return (eps_fn(x + h * v) - eps_fn(x - h * v)) / (2 * h * sigma)
    raise ValueError(f"method must be 'forward' or 'difference', got {method!r}.")


@torch.no_grad()
def fisher_trace(eps_fn, x: torch.Tensor, sigma: float, probes: int = 8, seed: int = 0,
                 method: str = "forward") -> torch.Tensor:
    """Hutchinson's estimate of tr F_t per batch element (``probes`` Rademacher vectors)."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for _ in range(probes):
        z = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
        total += (z * fisher_vector_product(eps_fn, x, z, sigma, method)).flatten(1).sum(1)
    return total / probes
