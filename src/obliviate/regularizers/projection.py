"""Gradient projection (CUIG, Lee et al. 2025): keep the cross-attention key/value outputs of
concepts close to the target unchanged by confining updates of to_k/to_v to the orthogonal
complement of their token-embedding subspace.

The protected subspace is spanned by the top singular vectors U of token states of prompts about
the target's siblings (same supertype) and of other retained prompts. Gradients are projected as
grad W <- grad W (I - U U^T). It is a constraint of the composition contract: the loop also
projects the request's accumulated update after every step (Adam rescales coordinates), so
W p = W_start p holds exactly for p in span(U), also beside masks and other subspaces.

``target_rank`` > 0 first removes the target's own directions from the protected states: the top
singular directions F of how the targets' token states differ from their anchors', so
U = basis[(I - F F^T) X]. Without it, when the retained prompts' states already span the target's
(the v2 world language, with 6-10 words a concept, does), the protection leaves the method nothing
to move: the best ESD recipe erased striped in 6% of images on shapes-t2i-v2 with target_rank=0.

``supertypes`` adds every direction of the token states of prompts that name the supertype of a
target or of a concept forgotten earlier ("a polygon", "a warm colour"), uncut, so from that
request on those prompts keep their keys and values exactly, as SuPLoRA's frozen down-projection
keeps its group's (a supertype first named by a later request was free to move until then).

``unconditional`` adds the empty prompt's token states the same way. Classifier-free guidance
mixes the unconditional prediction into every image, so keys and values moved there move every
image, retained ones included; on s10 the best adapter recipe moved them 14%, against 6% for
retained prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..training import ParameterConstraint, aligned_token_states, orthonormal_basis, protected_basis, token_states
from .base import Regularizer, register_regularizer

KV_WEIGHT = re.compile(r"attn2\.(to_k|to_v)\.weight$")


@dataclass
class ProjectionConfig:
    rank: int = field(default=48, metadata={"help": "dimension of the protected subspace"})
    prompts: int = field(default=128, metadata={"help": "prompts of protected concepts"})
    sibling_share: float = field(default=0.5, metadata={"help": "share of prompts about the target's siblings"})
    forgotten_share: float = field(default=0.0, metadata={
        "help": "share of prompts naming concepts earlier requests forgot: their keys and values, already erased, stay "
                "as they are (0: a later request may move them, and revive an earlier concept)"})
    target_rank: int = field(default=8, metadata={
        "help": "directions of the target (its token states minus its anchors') kept out of the protected subspace; "
                "0 protects them too (the tables made on shapes-t2i, v1)"})
    supertypes: bool = field(default=False, metadata={
        "help": "also keep exactly the keys and values of prompts naming the supertype of a target or of a concept "
                "forgotten earlier (\"a polygon\"): all their token-state directions join the protected subspace"})
    unconditional: bool = field(default=False, metadata={
        "help": "also keep exactly the keys and values of the empty prompt, which classifier-free guidance mixes into "
                "every image"})

    def __post_init__(self):
        if self.rank <= 0 or self.prompts <= 0 or self.target_rank < 0:
            raise ValueError("rank and prompts must be positive and target_rank >= 0")
        check_shares(self.sibling_share, self.forgotten_share)


def check_shares(sibling_share: float, forgotten_share: float) -> None:
    """The shares of ``protected_prompts``: each in [0, 1], together at most 1."""
    for name, share in (("sibling_share", sibling_share), ("forgotten_share", forgotten_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    if sibling_share + forgotten_share > 1:
        raise ValueError(f"sibling_share + forgotten_share must be at most 1, got {sibling_share + forgotten_share}")


def protected_prompts(session, n: int, sibling_share: float, forgotten_share: float = 0.0) -> list[str]:
    """Prompts of retained concepts, about ``sibling_share`` of them naming a sibling of a target
    (when the prompt source knows siblings), and ``forgotten_share`` of them naming a concept an
    earlier request forgot (when there is one)."""
    forgotten = session.context.forgotten + session.targets
    related = session.prompts.related_prompts(session.targets, forgotten, int(round(n * sibling_share)), session.rng)
    erased, count = [], int(round(n * forgotten_share))
    if session.context.forgotten and count:
        pairs = session.prompts.forget_pairs(session.context.forgotten, None, count, session.rng, avoid=session.targets)
        erased = [p.target for p in pairs]
    return related + erased + session.retain_prompts(n - len(related) - len(erased))


def supertype_prompts(session) -> list[str]:
    """Prompts naming the supertype of each target and of each concept forgotten earlier."""
    try:
        return session.prompts.supertype_prompts(session.prompts.supertype_of(session.context.forgotten + session.targets))
    except ValueError as err:
        raise ValueError(f"gradproj:supertypes=true needs targets whose supertype is known (the embedded world's); {err}") from err


class SubspaceProtection(Regularizer):
    """Shared mechanics: protect a subspace of text states on every trained cross-attention
    to_k/to_v weight (a constraint, so the loop keeps it exact whatever else constrains them)."""

    def protect(self, session, protected: torch.Tensor) -> None:
        """``protected``: (dim, k) orthonormal columns whose outputs must not change."""
        self.protected = protected.float()
        self.targets = {n: p for n, p in session.params.items() if KV_WEIGHT.search(n)}
        if not self.targets:
            raise ValueError(f"{self.name} protects cross-attention to_k/to_v weights, but none of them train; "
                             "use a trainable set that includes them (e.g. trainable=xattn).")
        self.start = {n: p.detach().clone() for n, p in self.targets.items()}

    def constraints(self, session) -> dict[str, ParameterConstraint]:
        return {n: ParameterConstraint(self.name, protected=self.protected) for n in self.targets}


@register_regularizer
class GradientProjection(SubspaceProtection):
    name = "gradproj"
    description = "project to_k/to_v updates off the token subspace of concepts close to the target"
    config_class = ProjectionConfig

    def setup(self, session) -> None:
        cfg = self.config
        states = token_states(session.model, protected_prompts(session, cfg.prompts, cfg.sibling_share, cfg.forgotten_share))
        own_shift = None
        if cfg.target_rank:
            concept, anchor = aligned_token_states(session.model, session.forget_prompts[:cfg.prompts],
                                                   session.anchor_prompts[:cfg.prompts])
            own_shift = concept - anchor
        protected = protected_basis(states, own_shift, cfg.rank, cfg.target_rank)
        exact = (supertype_prompts(session) if cfg.supertypes else []) + ([""] if cfg.unconditional else [])
        if exact:  # uncut: those prompts' outputs are kept exactly, not their main directions only
            states = token_states(session.model, exact).T
            kept = orthonormal_basis(states, states.shape[1], rtol=1e-6)
            protected = orthonormal_basis(torch.cat([protected, kept], 1), len(protected), rtol=1e-6)
        self.protect(session, protected)
