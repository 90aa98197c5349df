"""ErasePro (2025): closed-form erasure with a strict zero-residual constraint and a progressive
layer-wise schedule.

For a projection W (pretrained W0) whose inputs for the concept have top directions U, with G A
the inputs they should behave like (A = C^+ U), the edit solves

    min_W  lam ||W - W0||^2 + s_p sum_j ||(W - W0) p_j||^2     subject to   W U = T

    W = W0 + (T - W0 U) (U^T M^-1 U)^-1 U^T M^-1,   M = lam I + s_p sum_j p_j p_j^T

so target features map onto anchor features exactly (zero residual), not in the least-squares
sense of UCE. Two places to apply it (``layers``):

- ``kv`` (default): the cross-attention keys and values, T = W0 G A on every layer. They all
  read the same text states in parallel, so nothing downstream completes a partial alignment:
  the paper's zero residual must hold on each of them. ``deep_strength < 1`` keeps obliviate's
  earlier schedule, T_l = W0 (U + s_l (G A - U)) with s_l decaying from 1 at the shallowest layer
  to ``deep_strength`` at the deepest, which leaves a residual at depth.
  Every earlier request's erase rows stay in the store's state and their constraints are solved
  jointly, so earlier erasures remain exact; rows whose prompts show a concept forgotten later are
  retired first (``ErasureMemory``), and the request's directions recomputed without them.
- ``out``: the paper's progressive schedule, on the cross-attention output projections, whose
  inputs flow from one layer into the next. Shallow to deep, layer i is solved on the inputs X
  the *already edited* model gives it for the target prompts, with T = W0 Y, Y the inputs the
  pretrained model gives it for the anchor prompts on the same noisy latents; earlier layers'
  alignment shrinks what deeper layers must change. The p_j are the inputs of retained prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..training import OUT_PATTERN, projection_inputs
from .base import Edit, MethodResult, UnlearningMethod, register_method
from .closed_form import KV_PATTERN, ErasureMemory, erase_and_preserve_states, kv_layers, other_edits


@dataclass
class EraseProConfig:
    rank: int = field(default=8, metadata={"help": "concept directions constrained per request"})
    lam: float = field(default=0.5, metadata={"help": "pull towards the pretrained weights"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of retained prompts' outputs"})
    erase_prompts: int = field(default=32, metadata={"help": "prompts showing the targets"})
    preserve_prompts: int = field(default=256, metadata={"help": "prompts of retained concepts"})
    deep_strength: float = field(default=1.0, metadata={
        "help": "layers=kv: share of the anchor shift required at the deepest layer; 1 (the paper) keeps zero residual on every layer"})
    layers: str = field(default="kv", metadata={
        "help": "'kv': cross-attention keys/values; 'out': cross-attention outputs, progressively on features that flow between layers"})
    images: int = field(default=16, metadata={"help": "layers=out: images the model draws of the targets and of retained prompts"})
    sampling_steps: int = field(default=10, metadata={"help": "layers=out: denoising steps of those images"})

    def __post_init__(self):
        if self.rank <= 0 or self.erase_prompts <= 0 or self.preserve_prompts <= 0:
            raise ValueError("rank, erase_prompts and preserve_prompts must be positive")
        if self.lam <= 0 or self.preserve_scale < 0:
            raise ValueError("lam must be positive and preserve_scale >= 0")
        if not 0 < self.deep_strength <= 1:
            raise ValueError(f"deep_strength must lie in (0, 1], got {self.deep_strength}")
        if self.layers not in ("kv", "out"):
            raise ValueError(f"layers must be 'kv' or 'out', got {self.layers!r}")
        if self.layers == "out" and self.deep_strength != 1:
            raise ValueError("deep_strength applies to layers=kv; the progressive layers=out schedule aligns every layer exactly.")
        if self.images <= 0 or self.sampling_steps <= 0:
            raise ValueError("images and sampling_steps must be positive")


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


@torch.no_grad()
def noisy_drawings(model, prompts: list[str], steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): images the model draws for ``prompts``, noised to random timesteps."""
    seed = int(torch.randint(2**31, (1,), generator=generator))
    clean = model.to_latents(model.sample(prompts, steps=steps, seed=seed), generator=generator)
    noise = torch.randn(clean.shape, generator=generator).to(clean)
    t = model.sample_timesteps(len(clean), generator)
    return model.scheduler.add_noise(clean, noise, t), t


@register_method
class ErasePro(UnlearningMethod):
    name = "erasepro"
    description = "closed form with exact (zero-residual) target-to-anchor mapping on every K/V layer; layers=out: progressive by depth"
    config_class = EraseProConfig

    def unlearn(self, model, request, context) -> MethodResult:
        solve = self._progressive_outputs if self.config.layers == "out" else self._keys_and_values
        return solve(model, request, context)

    def _keys_and_values(self, model, request, context) -> MethodResult:
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

        current = model.state_tensors(KV_PATTERN)
        layers = unet_depth_order(kv_layers(current))
        deltas, residuals = {}, []
        state = {**memory.to_state(), "ranks": ranks, "basis": all_basis, "anchor": all_anchor}
        for depth, name in enumerate(layers):
            strength = 1 - (1 - cfg.deep_strength) * depth / max(1, len(layers) - 1)
            w0 = context.base_weights[name].double()
            anchor_out, basis_out = w0 @ all_anchor, w0 @ all_basis
            solved = zero_residual_solve(w0, all_basis, basis_out + strength * (anchor_out - basis_out), metric)
            state[f"own_delta.{name}"] = solved - w0
            residuals.append(float((solved @ all_basis - anchor_out).norm() / anchor_out.norm()))
            solved = solved + other_edits(current[name], w0, context.state.get(f"own_delta.{name}"))
            deltas[name] = solved.to(current[name].dtype) - current[name]
        return MethodResult(Edit(deltas=deltas), state, {"constraints": all_basis.shape[1], "edited_layers": len(deltas),
                                                         "max_residual": max(residuals),
                                                         "unet_forward_passes": 0, "unet_backward_passes": 0})

    def _progressive_outputs(self, model, request, context) -> MethodResult:
        """Shallow to deep, each output projection is solved on the inputs the already edited
        layers give it, and the model updated in place before the next (as gradient methods train
        it in place)."""
        cfg = self.config
        rng = np.random.default_rng(request.seed)
        generator = torch.Generator().manual_seed(request.seed)
        pairs = context.prompts.forget_pairs(tuple(request.targets), request.anchor, cfg.images, rng, avoid=context.forgotten)
        retained = context.prompts.retain_prompts(context.forgotten + tuple(request.targets), cfg.images, rng)
        targets, anchors = model.encode([p.target for p in pairs]), model.encode([p.anchor for p in pairs])
        noisy, t = noisy_drawings(model, [p.target for p in pairs], cfg.sampling_steps, generator)
        if retained:
            retained_encoding = model.encode(retained)
            retained_noisy, retained_t = noisy_drawings(model, retained, cfg.sampling_steps, generator)

        current = model.state_tensors(OUT_PATTERN)
        layers = unet_depth_order(list(current))
        if not layers:
            raise ValueError("The model has no cross-attention output projections (attn2.to_out.0) to edit; use layers=kv.")
        anchor_inputs = projection_inputs(model, layers, noisy, t, anchors, request.seed)  # pretrained model
        deltas, residuals = {}, []
        for name in layers:
            x = projection_inputs(model, [name], noisy, t, targets, request.seed)[name]
            basis, anchor = concept_directions(x, anchor_inputs[name], cfg.rank)
            metric = cfg.lam * torch.eye(x.shape[1], dtype=torch.float64)
            if retained:
                p = projection_inputs(model, [name], retained_noisy, retained_t, retained_encoding, request.seed)[name]
                # second moment per retained image, so lam means the same whatever the feature map's size
                metric = metric + cfg.preserve_scale * len(retained) * (p.T @ p) / len(p)
            w0 = current[name].double()
            weight = model.unet.get_parameter(name[len("unet."):])
            weight.data.copy_(zero_residual_solve(w0, basis, w0 @ anchor, metric).to(weight))
            residuals.append(float((weight.detach().double().cpu() @ basis - w0 @ anchor).norm() / (w0 @ anchor).norm()))
            deltas[name] = weight.detach().cpu() - current[name]
        drawings = 2 if retained else 1
        passes = drawings * cfg.sampling_steps + 1 + drawings * len(layers)  # batched UNet calls
        # earlier keys/values requests' erase rows stay in force for later ones
        return MethodResult(Edit(deltas=deltas), dict(context.state), {"edited_layers": len(deltas), "max_residual": max(residuals),
                                                      "unet_forward_passes": passes, "unet_backward_passes": 0})
