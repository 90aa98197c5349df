"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024), made incremental.

For every cross-attention key and value projection W (pretrained W0), UCE solves

    min_W  lam ||W - W0||^2 + s_e sum_i ||W c_i - W0 g_i||^2 + s_p sum_j ||W p_j - W0 p_j||^2

    W = (lam W0 + s_e sum_i W0 g_i c_i^T + s_p W0 P)(lam I + s_e sum_i c_i c_i^T + s_p P)^-1,
    P = sum_j p_j p_j^T

with c_i the token states of prompts showing a target, g_i the aligned token states of the same
prompt with the anchor instead (or the target dropped), and p_j token states of retained prompts.

Incremental: every request's erase rows (c_i, g_i) are the method's state in the store, so
request k adds its rows to those of requests 1..k-1 and solves once; earlier erasures stay in
force because every solve starts from W0 with all of them. The preserve set is rebuilt each
request from what is still retained, so a concept forgotten later stops being preserved, and
earlier erase rows whose prompts show it are retired (``ErasureMemory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Edit, MethodResult, UnlearningMethod, register_method
from .closed_form import KV_PATTERN, ErasureMemory, erase_and_preserve_states, kv_layers, other_edits


@dataclass
class UCEConfig:
    lam: float = field(default=0.5, metadata={"help": "lambda, pull towards the pretrained weights"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e, weight of the erase constraints"})
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p, weight of the preserve constraints"})
    erase_prompts: int = field(default=32, metadata={"help": "prompts showing each request's targets"})
    preserve_prompts: int = field(default=256, metadata={"help": "prompts of retained concepts (more keeps them better)"})
    preserve: str = field(default="retained", metadata={
        "help": "'retained': keep the outputs of retained concepts; 'none': erase with no preservation (explicit choice)"})
    incremental: bool = field(default=True, metadata={
        "help": "keep running sums across requests (false: solve each request alone from the current weights, "
                "as the reference code does; for comparison)"})

    def __post_init__(self):
        if self.lam <= 0:
            raise ValueError(f"lam must be positive (it keeps the solve well posed), got {self.lam}")
        if self.erase_scale <= 0 or self.preserve_scale < 0:
            raise ValueError("erase_scale must be positive and preserve_scale >= 0")
        if self.preserve not in ("retained", "none"):
            raise ValueError(f"preserve must be 'retained' or 'none', got {self.preserve!r}")
        if self.erase_prompts <= 0 or self.preserve_prompts <= 0:
            raise ValueError("erase_prompts and preserve_prompts must be positive")


def uce_solve(w0: torch.Tensor, erase_values: torch.Tensor, erase_gram: torch.Tensor, preserve_gram: torch.Tensor,
              config: UCEConfig) -> torch.Tensor:
    """The closed form for one layer; ``erase_values`` is sum W0 g c^T (out x in)."""
    eye = torch.eye(w0.shape[1], dtype=torch.float64)
    lhs = config.lam * w0 + config.erase_scale * erase_values + config.preserve_scale * w0 @ preserve_gram
    rhs = config.lam * eye + config.erase_scale * erase_gram + config.preserve_scale * preserve_gram
    return torch.linalg.solve(rhs.T, lhs.T).T  # lhs @ rhs^-1 without forming the inverse


@register_method
class UCE(UnlearningMethod):
    name = "uce"
    description = "Unified Concept Editing: closed-form cross-attention K/V edit, incremental across requests"
    config_class = UCEConfig

    def unlearn(self, model, request, context) -> MethodResult:
        cfg = self.config
        rng = np.random.default_rng(request.seed)
        rows, p = erase_and_preserve_states(model, request, context, cfg.erase_prompts, cfg.preserve_prompts, rng,
                                            require_preserve=cfg.preserve == "retained")
        dim = rows.targets.shape[1]
        preserve_gram = p.T @ p if cfg.preserve == "retained" else torch.zeros(dim, dim, dtype=torch.float64)
        earlier = ErasureMemory.from_state(context.state) if cfg.incremental else None
        memory = earlier.extend(rows) if earlier is not None else rows
        active = memory.active(context.prompts, context.forgotten + tuple(request.targets))
        c, g = memory.targets[active].double(), memory.anchors[active].double()
        erase_gram, erase_cross = c.T @ c, g.T @ c
        state: dict[str, torch.Tensor] = memory.to_state() if cfg.incremental else {}
        deltas: dict[str, torch.Tensor] = {}
        current = model.state_tensors(KV_PATTERN)
        for name in kv_layers(current):
            weight = current[name]
            # incremental: every solve starts from the pretrained weights with all erasures so far
            w0 = (context.base_weights[name] if cfg.incremental else weight).double()
            solved = uce_solve(w0, w0 @ erase_cross, erase_gram, preserve_gram, cfg)
            if cfg.incremental:
                state[f"own_delta.{name}"] = solved - w0
                solved = solved + other_edits(weight, w0, context.state.get(f"own_delta.{name}"))
            deltas[name] = solved.to(weight.dtype) - weight
        return MethodResult(Edit(deltas=deltas), state, {"erase_tokens": int(active.sum()), "edited_layers": len(deltas),
                                                         "retired_tokens": int((~active).sum()),
                                                         "unet_forward_passes": 0, "unet_backward_passes": 0})
