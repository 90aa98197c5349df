"""FG-OrIU (feature-gradient orthogonality for incremental unlearning), adapted to the
cross-attention key/value projections of a text-to-image UNet, whose input features are the
text token states.

Per request:
- forgetting subspace F_new: top singular directions of how the targets' token states differ
  from their anchors'; merged with the forgetting subspace of earlier requests (F = orth[F_old, F_new],
  capped at ``max_forget_rank``);
- remaining subspace R: top directions of retained prompts' token states with F projected out,
  contracted each request (rank x ``contract``, at least ``min_remain_rank``): the more has been
  forgotten, the less the remaining subspace claims;
- gradient orthogonality: to_k/to_v gradients are projected off span[R, F_old], so an update
  neither disturbs retained features nor re-maps earlier forgotten ones; the request's
  accumulated update is re-projected after every step (the composition contract), which makes
  this exact under Adam and beside any other constraint;
- feature orthogonality: a penalty on the component of the forgetting features' new outputs that
  lies in the retained outputs' span, so the forgotten concept is not re-expressed through
  retained directions.
The subspaces are the regularizer's state in the store, so rollback restores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..training import aligned_token_states, orthonormal_basis, token_states
from .base import register_regularizer
from .projection import SubspaceProtection


@dataclass
class FGOrIUConfig:
    forget_rank: int = field(default=4, metadata={"help": "directions added to the forgetting subspace per request"})
    max_forget_rank: int = field(default=64, metadata={"help": "cap on the merged forgetting subspace"})
    remain_rank: int = field(default=48, metadata={"help": "initial dimension of the remaining subspace"})
    min_remain_rank: int = field(default=16, metadata={"help": "floor of the contracting remaining subspace"})
    contract: float = field(default=0.9, metadata={"help": "remaining rank multiplier per request"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of the feature-orthogonality penalty"})
    prompts: int = field(default=64, metadata={"help": "prompts per subspace estimate"})

    def __post_init__(self):
        if min(self.forget_rank, self.max_forget_rank, self.remain_rank, self.min_remain_rank, self.prompts) <= 0:
            raise ValueError("ranks and prompts must be positive")
        if not 0 < self.contract <= 1:
            raise ValueError(f"contract must lie in (0, 1], got {self.contract}")
        if self.feature_weight < 0:
            raise ValueError("feature_weight must be >= 0")


RTOL = 1e-8  # singular values below this share of the largest add no direction


@register_regularizer
class FGOrIU(SubspaceProtection):
    name = "fgoriu"
    description = "FG-OrIU: dynamic forgetting/remaining subspaces, orthogonal gradients and features"
    config_class = FGOrIUConfig

    def setup(self, session) -> None:
        cfg, saved = self.config, session.context.regularizer_states.get(self.name, {})
        rng = np.random.default_rng(session.request.seed)
        pairs = session.prompts.forget_pairs(session.targets, session.request.anchor, cfg.prompts, rng)
        with torch.no_grad():
            concept, anchor = aligned_token_states(session.model, [p.target for p in pairs], [p.anchor for p in pairs])
            retained = token_states(session.model, session.retain_prompts(cfg.prompts))
        dim = concept.shape[1]
        old_forget = saved.get("forget", torch.zeros(dim, 0, dtype=torch.float64)).double()
        new_forget = orthonormal_basis((concept - anchor).T, cfg.forget_rank, RTOL)
        self.forget = orthonormal_basis(torch.cat([old_forget, new_forget], 1), cfg.max_forget_rank, RTOL)
        requests = int(saved.get("requests", torch.tensor(0)).item()) + 1
        remain_rank = max(cfg.min_remain_rank, int(round(cfg.remain_rank * cfg.contract ** (requests - 1))))
        off_forget = torch.eye(dim, dtype=torch.float64) - self.forget @ self.forget.T
        self.remain = orthonormal_basis(off_forget @ retained.T, remain_rank, RTOL)
        self.requests = requests
        self.protect(session, orthonormal_basis(torch.cat([self.remain, old_forget], 1), dim, RTOL))
        self.forget_features = concept[:256].float()

    def penalty(self, session) -> torch.Tensor | None:
        if not self.config.feature_weight:
            return None
        total = 0.0
        for n, p in self.targets.items():
            change = (p - self.start[n]) @ self.forget_features.T.to(p)  # (out, tokens): new output of forget features
            retained_out = self.start[n] @ self.remain.float().to(p)  # (out, r): retained outputs' span
            basis, _ = torch.linalg.qr(retained_out)
            total = total + (basis.T @ change).pow(2).mean()
        return self.config.feature_weight * total

    def state(self) -> dict[str, torch.Tensor]:
        return {"forget": self.forget, "remain": self.remain, "requests": torch.tensor(self.requests)}
