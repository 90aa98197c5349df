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

KV_PATTERN = re.compile(r"attn2\.(to_k|to_v)\.weight$")


def aligned_token_states(model, targets: list[str], anchors: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states of each target prompt and, position by position, of its anchor prompt.

    Tokens before and after the words that differ align one to one; the target's differing
    tokens align with the anchor's last differing token (or the next shared one when the anchor
    just drops the words), in the manner of MACE's closed-form refinement."""
    tokenizer = model.text_encoder.tokenizer
    target_enc, anchor_enc = model.encode(targets), model.encode(anchors)
    target_ids = tokenizer(list(targets), padding="max_length", truncation=True, max_length=model.text_encoder.max_length)["input_ids"]
    anchor_ids = tokenizer(list(anchors), padding="max_length", truncation=True, max_length=model.text_encoder.max_length)["input_ids"]
    cs, gs = [], []
    for i in range(len(targets)):
        length_t = int(target_enc.mask[i].sum())
        length_a = int(anchor_enc.mask[i].sum())
        t_ids, a_ids = target_ids[i][:length_t], anchor_ids[i][:length_a]
        prefix = 0
        while prefix < min(length_t, length_a) and t_ids[prefix] == a_ids[prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(length_t, length_a) - prefix and t_ids[length_t - 1 - suffix] == a_ids[length_a - 1 - suffix]:
            suffix += 1
        # the target's differing tokens map to the anchor's last differing token, or to the next
        # shared token when the anchor only drops words
        middle = length_a - suffix - 1 if length_a - suffix > prefix else min(prefix, length_a - 1)
        mapping = [p if p < prefix else p - length_t + length_a if p >= length_t - suffix else middle
                   for p in range(length_t)]
        cs.append(target_enc.states[i, :length_t])
        gs.append(anchor_enc.states[i, mapping])
    return torch.cat(cs).double().cpu(), torch.cat(gs).double().cpu()


def token_states(model, prompts: list[str]) -> torch.Tensor:
    encoding = model.encode(prompts)
    return encoding.states[encoding.mask.bool()].double().cpu()


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
