"""CE-SDWV-style erasure in text space: no UNet weight changes.

1. A word vocabulary for the concept: every name and synonym of the targets (and, for free text,
   the target strings plus a user word list), placed in the training templates.
2. Its semantic components: the top singular directions u_i (singular values s_i) of how the
   vocabulary's token states differ from the same prompts without the concept, made orthogonal
   to the principal subspace R of retained prompts' token states. Each is suppressed in
   proportion to how strongly it carries the concept (``suppression=adaptive``, the paper's
   rule): T = I - sum_i (s_i / s_1) u_i u_i^T, so the strongest component is removed and a weak
   one barely touched. ``suppression=fixed`` removes all ``concept_rank`` of them alike,
   T = I - U U^T (obliviate's earlier rule).
3. Gradient-orthogonal token optimisation: a correction B to T is trained so the UNet's output
   for target prompts matches its output for the anchor prompts, with every gradient projected
   as grad B <- grad B (I - R R^T); retained token states r in span(R) keep T r = r exactly.

The result is a ``LinearTextTransform`` the model bundle applies when it encodes prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.text import TextEncoding
from ..world.targets import PromptPair
from ..training import PassCounter, aligned_token_states, orthonormal_basis, token_states
from .base import Edit, MethodResult, UnlearningMethod, register_method


SUPPRESSIONS = ("adaptive", "fixed")


@dataclass
class SDWVConfig:
    concept_rank: int = field(default=8, metadata={"help": "semantic directions of the concept to suppress"})
    suppression: str = field(default="adaptive", metadata={
        "help": "adaptive: each direction in proportion to its singular value (the paper); fixed: all of them fully"})
    retain_rank: int = field(default=64, metadata={"help": "dimension of the protected retained subspace"})
    vocabulary_prompts: int = field(default=64, metadata={"help": "prompts built from the concept's vocabulary"})
    retain_prompts: int = field(default=128, metadata={"help": "retained prompts that define the protected subspace"})
    words: tuple[str, ...] = field(default=(), metadata={"help": "extra words for the vocabulary (comma-separated)"})
    steps: int = field(default=30, metadata={"help": "steps of gradient-orthogonal optimisation (0: projection only)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate for the correction"})
    batch_size: int = field(default=8, metadata={"help": "prompts per step"})

    def __post_init__(self):
        for name in ("concept_rank", "retain_rank", "vocabulary_prompts", "retain_prompts", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps < 0 or self.learning_rate <= 0:
            raise ValueError("steps must be >= 0 and learning_rate positive")
        if self.suppression not in SUPPRESSIONS:
            raise ValueError(f"suppression must be one of {', '.join(SUPPRESSIONS)}, got {self.suppression!r}")


def suppression_transform(shift: torch.Tensor, keep_retained: torch.Tensor, rank: int,
                          adaptive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, U, weights): the concept's top ``rank`` components U of ``shift`` (rows: how token
    states move with the concept) outside the retained subspace, their suppression weights
    (s_i / s_1, or all 1 when not ``adaptive``), and T = I - U diag(weights) U^T."""
    u, s, _ = torch.linalg.svd((shift.double() @ keep_retained).T, full_matrices=False)
    keep = min(rank, int((s > 1e-8 * s[0]).sum())) if len(s) and s[0] > 0 else 0
    u, s = u[:, :keep], s[:keep]
    weights = s / s[0] if adaptive else torch.ones_like(s)
    return torch.eye(len(keep_retained), dtype=torch.float64) - (u * weights) @ u.T, u, weights


@register_method
class SDWV(UnlearningMethod):
    name = "sdwv"
    description = "text-space erasure: suppress the concept's semantic directions, no weight changes (CE-SDWV)"
    config_class = SDWVConfig

    def unlearn(self, model, request, context) -> MethodResult:
        cfg = self.config
        rng = np.random.default_rng(request.seed)
        targets = tuple(request.targets) + tuple(cfg.words)
        pairs = context.prompts.forget_pairs(tuple(request.targets), request.anchor, cfg.vocabulary_prompts, rng)
        pairs += [PromptPair(f"a {w}", f"a {request.anchor}" if request.anchor else "a") for w in cfg.words]
        with torch.no_grad():
            concept, anchor = aligned_token_states(model, [p.target for p in pairs], [p.anchor for p in pairs])
            retained = token_states(model, context.prompts.retain_prompts(context.forgotten + targets, cfg.retain_prompts, rng)
                                    or [""])
        dim = concept.shape[1]
        eye = torch.eye(dim, dtype=torch.float64)
        protect = orthonormal_basis(retained.T, cfg.retain_rank)
        keep_retained = eye - protect @ protect.T
        transform, semantic, weights = suppression_transform(concept - anchor, keep_retained, cfg.concept_rank,
                                                             cfg.suppression == "adaptive")
        transform = transform.float()

        counter = PassCounter(model.unet)
        correction = torch.zeros(dim, dim, requires_grad=True)
        stats = {"semantic_directions": semantic.shape[1], "effective_suppressed_directions": float(weights.sum()),
                 "unet_backward_passes": 0}
        if cfg.steps:
            self._optimise(model, pairs, transform, correction, keep_retained.float(), cfg, rng, stats, context)
        counter.close()
        matrix = (transform + correction.detach() @ keep_retained.float()).contiguous()
        stats["unet_forward_passes"] = counter.forward
        return MethodResult(Edit(additions={model.next_text_transform_key(): matrix}), {}, stats)

    def _optimise(self, model, pairs, transform, correction, keep_retained, cfg, rng, stats, context) -> None:
        """Train B so that T + B makes target prompts predict like their anchors; B's gradient is
        confined to the complement of the retained subspace."""
        optimizer = torch.optim.Adam([correction], lr=cfg.learning_rate)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        drawn = pairs[:cfg.batch_size * 2]  # x_0: the model's own images of the anchors (data-free)
        with torch.no_grad():
            images = model.sample([p.anchor for p in drawn], steps=10, seed=int(rng.integers(2**31)))
            anchor_latents = model.to_latents(images, generator=generator)
        for _step in range(cfg.steps):
            index = rng.integers(0, len(drawn), cfg.batch_size)
            target_enc = model.encode([drawn[i].target for i in index])
            with torch.no_grad():
                anchor_enc = model.encode([drawn[i].anchor for i in index])
                clean = anchor_latents[index]
                noise = torch.randn(clean.shape, generator=generator).to(clean)
                t = model.sample_timesteps(cfg.batch_size, generator)
                noisy = model.scheduler.add_noise(clean, noise, t)
                goal = model.predict(noisy, t, anchor_enc)
            matrix = (transform + correction @ keep_retained).to(model.device)
            edited = TextEncoding(target_enc.states @ matrix.T, target_enc.mask)
            loss = (model.predict(noisy, t, edited) - goal).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["unet_backward_passes"] += 1
            with torch.no_grad():
                correction.grad.copy_(correction.grad @ keep_retained)
            optimizer.step()
            if context.progress:
                context.progress(1, loss=round(float(loss.detach()), 5))
        stats["final_loss"] = float(loss.detach())

