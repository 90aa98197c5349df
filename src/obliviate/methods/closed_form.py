"""What the closed-form editors (UCE, ErasePro) share: aligned token states of erase prompts,
the memory of every request's erase rows, and bookkeeping for the key/value layers they solve.

Why a memory of rows rather than running sums: with a bidirectional text encoder every token of
"a striped red circle" carries "red". An erase row from a request forgetting striped maps its
tokens to the anchor outputs of "a red circle", which hold red in place; when red is forgotten
later, those rows fight the new request. The memory retires such rows (see
``ErasureMemory.active``), so later requests erase about as well as earlier ones
(``benchmarks/s10.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..training.subspace import aligned_token_states, token_states

KV_PATTERN = re.compile(r"attn2\.(to_k|to_v)\.weight$")


@dataclass(frozen=True)
class ErasureMemory:
    """Erase rows of the requests so far: each row is a token state of a prompt showing a target
    (``targets``) and the aligned token state of its anchor prompt (``anchors``), with the label
    row of that prompt, the concepts already forgotten when the row was added (``covered``) and
    the ordinal of its request. States are float32, as the encoder returns them, so a stored
    memory reproduces a solve exactly."""

    targets: torch.Tensor  # (n, d)
    anchors: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n, domains) int64; (n, 0) for free text
    covered: torch.Tensor  # (n, concepts) bool
    request: torch.Tensor  # (n,) int64

    KEYS = ("targets", "anchors", "labels", "covered", "request")

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ErasureMemory | None":
        if not all(f"erase.{k}" in state for k in cls.KEYS):
            return None
        return cls(**{k: state[f"erase.{k}"] for k in cls.KEYS})

    def to_state(self) -> dict[str, torch.Tensor]:
        return {f"erase.{k}": getattr(self, k) for k in self.KEYS}

    @property
    def requests(self) -> int:
        return int(self.request.max()) + 1 if len(self.request) else 0

    def extend(self, new: "ErasureMemory") -> "ErasureMemory":
        """This memory with ``new``'s rows appended as the next request."""
        return ErasureMemory(*(torch.cat([getattr(self, k), getattr(new, k)]) for k in self.KEYS[:4]),
                             torch.cat([self.request, torch.full_like(new.request, self.requests)]))

    def active(self, prompts, forgotten: tuple[str, ...]) -> torch.Tensor:
        """Rows still in force: those whose prompt shows no concept forgotten after their request."""
        retired = prompts.shows_uncovered(self.labels.numpy(), self.covered.numpy(), tuple(forgotten))
        return ~torch.from_numpy(retired)


def erase_and_preserve_states(model, request, context, erase_prompts: int, preserve_prompts: int, rng,
                              require_preserve: bool = True) -> tuple[ErasureMemory, torch.Tensor]:
    """This request's erase rows, and token states of prompts of what is still retained (empty
    when the store names nothing to retain). Erase prompts avoid concepts forgotten earlier: the
    closed form maps every token of an erase prompt to the *pretrained* outputs of its anchor,
    which would bring such a concept back."""
    prompts = context.prompts
    pairs = prompts.forget_pairs(tuple(request.targets), request.anchor, erase_prompts, rng, avoid=context.forgotten)
    with torch.no_grad():
        c, g = aligned_token_states(model, [p.target for p in pairs], [p.anchor for p in pairs])
        tokens = model.encode([p.target for p in pairs]).mask.sum(1).long().cpu()
        retained = prompts.retain_prompts(context.forgotten + tuple(request.targets), preserve_prompts, rng)
        if not retained and require_preserve:
            raise ValueError(f"{request.method} has no retained concepts to preserve; give the store a --retain list or "
                             "set preserve=none to erase without preservation.")
        preserved = token_states(model, retained) if retained else torch.zeros(0, c.shape[1], dtype=torch.float64)
    labels = torch.tensor([p.labels for p in pairs], dtype=torch.long).reshape(len(pairs), -1)
    covered = torch.from_numpy(prompts.concept_mask(context.forgotten + tuple(request.targets)))
    rows = ErasureMemory(c.float(), g.float(), labels.repeat_interleave(tokens, 0),
                         covered.expand(len(c), -1).clone(), torch.zeros(len(c), dtype=torch.long))
    return rows, preserved


def kv_layers(weights: dict[str, torch.Tensor]) -> list[str]:
    layers = [k for k in weights if KV_PATTERN.search(k)]
    if not layers:
        raise ValueError("The model has no cross-attention key/value projections (attn2.to_k / attn2.to_v) to edit.")
    return layers


def other_edits(current: torch.Tensor, pretrained: torch.Tensor, own_delta: torch.Tensor | None) -> torch.Tensor:
    """What other requests (other methods) changed in a layer: current - pretrained - our own
    share. A closed form solved from the pretrained weights adds this back, so it never undoes
    another method's edit of the same layer."""
    return current.double() - pretrained.double() - (own_delta.double() if own_delta is not None else 0)
