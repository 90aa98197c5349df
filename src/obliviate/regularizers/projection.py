"""Gradient projection (CUIG, Lee et al. 2025): keep the cross-attention key/value outputs of
concepts close to the target unchanged by confining updates of to_k/to_v to the orthogonal
complement of their token-embedding subspace.

The protected subspace is spanned by the top singular vectors U of token states of prompts about
the target's siblings (same supertype) and of other retained prompts. Gradients are projected as
grad W <- grad W (I - U U^T); because Adam rescales coordinates, the accumulated update of the
request is projected again after every step, so W p = W_start p holds exactly for p in span(U).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .base import Regularizer, register_regularizer

KV_WEIGHT = re.compile(r"attn2\.(to_k|to_v)\.weight$")


@dataclass
class ProjectionConfig:
    rank: int = field(default=48, metadata={"help": "dimension of the protected subspace"})
    prompts: int = field(default=128, metadata={"help": "prompts of protected concepts"})
    sibling_share: float = field(default=0.5, metadata={"help": "share of prompts about the target's siblings"})

    def __post_init__(self):
        if self.rank <= 0 or self.prompts <= 0:
            raise ValueError("rank and prompts must be positive")
        if not 0 <= self.sibling_share <= 1:
            raise ValueError(f"sibling_share must lie in [0, 1], got {self.sibling_share}")


def protected_prompts(session, n: int, sibling_share: float) -> list[str]:
    """Prompts of retained concepts, about half of them naming a sibling of a target."""
    prompts, rng = session.context.prompts, session.rng
    forgotten = session.context.forgotten + tuple(session.request.targets)
    siblings = []
    if hasattr(prompts, "ontology"):
        onto = prompts.ontology
        targets = {c.name for c in prompts.target_concepts(tuple(session.request.targets))}
        gone = {c.name for c in prompts.target_concepts(forgotten)}
        siblings = sorted({s for c in prompts.target_concepts(tuple(session.request.targets))
                           for s in onto.supertypes[c.parent] if s not in targets | gone})
    n_sib = int(round(n * sibling_share)) if siblings else 0
    out = []
    for i in range(n_sib):
        sibling = siblings[i % len(siblings)]
        out += [p.target for p in prompts.forget_pairs((sibling,), None, 1, rng)]
    return out + session.retain_prompts(n - n_sib)


def orthonormal_basis(states: torch.Tensor, rank: int) -> torch.Tensor:
    """Top ``rank`` left singular vectors of (dim x count) states."""
    u, _, _ = torch.linalg.svd(states.double(), full_matrices=False)
    return u[:, :min(rank, u.shape[1])]


class SubspaceProtection(Regularizer):
    """Shared mechanics: confine to_k/to_v updates to the orthogonal complement of a protected
    subspace of text states, in the gradient and (exactly, whatever the optimizer) in the
    request's accumulated update."""

    def protect(self, session, protected: torch.Tensor) -> None:
        """``protected``: (dim, k) orthonormal columns whose outputs must not change."""
        self.protected = protected.float()
        self.complement = (torch.eye(protected.shape[0], dtype=torch.float64) - protected.double() @ protected.double().T).float()
        self.targets = {n: p for n, p in session.params.items() if KV_WEIGHT.search(n)}
        if not self.targets:
            raise ValueError(f"{self.name} protects cross-attention to_k/to_v weights, but none of them train; "
                             "use a trainable set that includes them (e.g. trainable=xattn).")
        self.start = {n: p.detach().clone() for n, p in self.targets.items()}

    def transform_gradients(self, session) -> None:
        for p in self.targets.values():
            if p.grad is not None:
                p.grad.copy_(p.grad @ self.complement.to(p.grad))

    @torch.no_grad()
    def after_step(self, session) -> None:
        for n, p in self.targets.items():
            p.copy_(self.start[n] + (p - self.start[n]) @ self.complement.to(p))


@register_regularizer
class GradientProjection(SubspaceProtection):
    name = "gradproj"
    description = "project to_k/to_v updates off the token subspace of concepts close to the target"
    config_class = ProjectionConfig

    def setup(self, session) -> None:
        encoding = session.model.encode(protected_prompts(session, self.config.prompts, self.config.sibling_share))
        states = encoding.states[encoding.mask.bool()].T  # (dim, tokens)
        self.basis = orthonormal_basis(states, self.config.rank).float()
        self.protect(session, self.basis)
