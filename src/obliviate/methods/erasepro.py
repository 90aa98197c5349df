"""ErasePro (2025): closed-form erasure with a strict zero-residual constraint and a progressive
layer-wise schedule.

For each cross-attention key/value projection W (pretrained W0), with U the top directions of the
concept's token states and A = C^+ U their coefficients, the edit solves

    min_W  lam ||W - W0||^2 + s_p sum_j ||(W - W0) p_j||^2     subject to   W U = T_l

    W = W0 + (T_l - W0 U) (U^T M^-1 U)^-1 U^T M^-1,   M = lam I + s_p sum_j p_j p_j^T

so target features map onto anchor features exactly, not in the least-squares sense of UCE. The
target of layer l is T_l = W0 (U + s_l (G A - U)): the full anchor features (s_l = 1) at the
shallowest layer, decaying to ``deep_strength`` at the deepest, so sensitive deep layers move
least. Every earlier request's erase rows stay in the store's state and their constraints are
solved jointly, so earlier erasures remain exact; rows whose prompts show a concept forgotten
later are retired first (``ErasureMemory``), and the request's directions recomputed without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Edit, MethodResult, UnlearningMethod, register_method
from .closed_form import ErasureMemory, erase_and_preserve_states, kv_layers, other_edits


@dataclass
class EraseProConfig:
    rank: int = field(default=8, metadata={"help": "concept directions constrained per request"})
    lam: float = field(default=0.5, metadata={"help": "pull towards the pretrained weights"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of retained prompts' outputs"})
    erase_prompts: int = field(default=32, metadata={"help": "prompts showing the targets"})
    preserve_prompts: int = field(default=256, metadata={"help": "prompts of retained concepts"})
    deep_strength: float = field(default=0.5, metadata={"help": "share of the anchor shift required at the deepest layer (1 = uniform)"})

    def __post_init__(self):
        if self.rank <= 0 or self.erase_prompts <= 0 or self.preserve_prompts <= 0:
            raise ValueError("rank, erase_prompts and preserve_prompts must be positive")
        if self.lam <= 0 or self.preserve_scale < 0:
            raise ValueError("lam must be positive and preserve_scale >= 0")
        if not 0 < self.deep_strength <= 1:
            raise ValueError(f"deep_strength must lie in (0, 1], got {self.deep_strength}")


def unet_depth_order(names: list[str]) -> list[str]:
    """Layers from shallow to deep along the UNet's path: down blocks, middle, up blocks."""
    def key(name: str):
        part = 0 if name.startswith("unet.down_blocks") else 1 if name.startswith("unet.mid_block") else 2
        numbers = [int(n) for n in re.findall(r"\.(\d+)\.", name)]
        return part, numbers
    return sorted(names, key=key)


def concept_directions(c: torch.Tensor, g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` directions U of a request's target token states (those the concept
    moves) and G A, where each should go: A = C^+ U, so C^T A = U."""
    moved = (c - g).norm(dim=1) > 1e-6 * c.norm(dim=1).max()
    c, g = c[moved], g[moved]
    u, s, vh = torch.linalg.svd(c.T, full_matrices=False)
    r = min(rank, int((s > 1e-8 * s[0]).sum()))
    return u[:, :r], g.T @ (vh[:r].T / s[:r])


def zero_residual_solve(w0: torch.Tensor, basis: torch.Tensor, targets: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """The W closest to W0 in the ``metric`` norm with W basis = targets exactly."""
    m_inv_u = torch.linalg.solve(metric, basis)  # M^-1 U
    gram = basis.T @ m_inv_u  # U^T M^-1 U
    return w0 + (targets - w0 @ basis) @ torch.linalg.solve(gram, m_inv_u.T)


@register_method
class ErasePro(UnlearningMethod):
    name = "erasepro"
    description = "closed form with exact (zero-residual) target-to-anchor mapping, progressive by depth"
    config_class = EraseProConfig

    def unlearn(self, model, request, context) -> MethodResult:
        cfg = self.config
        rng = np.random.default_rng(request.seed)
        rows, p = erase_and_preserve_states(model, request, context, cfg.erase_prompts, cfg.preserve_prompts, rng,
                                            require_preserve=False)
        earlier = ErasureMemory.from_state(context.state)
        memory = earlier.extend(rows) if earlier is not None else rows
        ranks = torch.cat([context.state.get("ranks", torch.zeros(0, dtype=torch.long)), torch.tensor([cfg.rank])])
        active = memory.active(context.prompts, context.forgotten + tuple(request.targets))
        directions = [concept_directions(memory.targets[keep].double(), memory.anchors[keep].double(), int(ranks[r]))
                      for r in range(memory.requests) if (keep := active & (memory.request == r)).any()]
        all_basis = torch.cat([basis for basis, _ in directions], 1)
        all_anchor = torch.cat([anchor for _, anchor in directions], 1)
        dim = all_basis.shape[0]
        if all_basis.shape[1] >= dim:
            raise ValueError(f"ErasePro has {all_basis.shape[1]} exact constraints for {dim}-d text states; "
                             "lower `rank` or roll back earlier requests.")
        metric = cfg.lam * torch.eye(dim, dtype=torch.float64) + cfg.preserve_scale * (p.T @ p)

        current = model.state_tensors()
        layers = unet_depth_order(kv_layers(current))
        deltas = {}
        state = {**memory.to_state(), "ranks": ranks, "basis": all_basis, "anchor": all_anchor}
        for depth, name in enumerate(layers):
            strength = 1 - (1 - cfg.deep_strength) * depth / max(1, len(layers) - 1)
            w0 = context.base_weights[name].double()
            targets = w0 @ (all_basis + strength * (all_anchor - all_basis))
            solved = zero_residual_solve(w0, all_basis, targets, metric)
            state[f"own_delta.{name}"] = solved - w0
            solved = solved + other_edits(current[name], w0, context.state.get(f"own_delta.{name}"))
            deltas[name] = solved.to(current[name].dtype) - current[name]
        return MethodResult(Edit(deltas=deltas), state, {"constraints": all_basis.shape[1], "edited_layers": len(deltas),
                                                         "unet_forward_passes": 0, "unet_backward_passes": 0})
