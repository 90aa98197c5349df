"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024), made incremental.

For every cross-attention key and value projection W (pretrained W0), UCE solves

    min_W  lam ||W - W0||^2 + s_e sum_i ||W c_i - W0 g_i||^2 + s_p sum_j ||W p_j - W0 p_j||^2

    W = (lam W0 + s_e sum_i W0 g_i c_i^T + s_p W0 P)(lam I + s_e sum_i c_i c_i^T + s_p P)^-1,
    P = sum_j p_j p_j^T

with c_i the token states of prompts showing a target, g_i the aligned token states of the same
prompt with the anchor instead (or the target dropped), and p_j token states of retained prompts.

Incremental: the erase sums (sum g_i c_i^T and sum c_i c_i^T) are the method's state in the
store, so request k adds its pairs to those of requests 1..k-1 and solves once; earlier erasures
stay in force because every solve starts from W0 with all of them. The preserve set is rebuilt
each request from what is still retained, so a concept forgotten later stops being preserved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Edit, MethodResult, UnlearningMethod, register_method

KV_PATTERN = re.compile(r"attn2\.(to_k|to_v)\.weight$")


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


def erase_and_preserve_states(model, request, context, erase_prompts: int, preserve_prompts: int, rng,
                              require_preserve: bool = True):
    """Aligned (target, anchor) token states of prompts showing the targets, and token states of
    prompts of what is still retained (empty when the store names nothing to retain). Erase
    prompts avoid concepts forgotten earlier: the closed form maps every token of an erase prompt
    to the *pretrained* outputs of its anchor, which would bring such a concept back."""
    pairs = context.prompts.forget_pairs(tuple(request.targets), request.anchor, erase_prompts, rng,
                                         avoid=context.forgotten)
    with torch.no_grad():
        c, g = aligned_token_states(model, [p.target for p in pairs], [p.anchor for p in pairs])
        retained = context.prompts.retain_prompts(context.forgotten + tuple(request.targets), preserve_prompts, rng)
        if not retained and require_preserve:
            raise ValueError(f"{request.method} has no retained concepts to preserve; give the store a --retain list or "
                             "set preserve=none to erase without preservation.")
        p = token_states(model, retained) if retained else torch.zeros(0, c.shape[1], dtype=torch.float64)
    return c, g, p


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
        c, g, p = erase_and_preserve_states(model, request, context, cfg.erase_prompts, cfg.preserve_prompts, rng,
                                            require_preserve=cfg.preserve == "retained")
        preserve_gram = p.T @ p if cfg.preserve == "retained" else torch.zeros(c.shape[1], c.shape[1], dtype=torch.float64)
        memory = context.state if cfg.incremental else {}
        erase_gram = memory.get("erase_gram", torch.zeros_like(preserve_gram)).double() + c.T @ c
        state: dict[str, torch.Tensor] = {"erase_gram": erase_gram} if cfg.incremental else {}
        deltas: dict[str, torch.Tensor] = {}
        current = model.state_tensors()
        for name in kv_layers(current):
            weight = current[name]
            # incremental: every solve starts from the pretrained weights with all erasures so far
            w0 = (context.base_weights[name] if cfg.incremental else weight).double()
            key = f"erase_values.{name}"
            erase_values = memory.get(key, torch.zeros_like(w0)).double() + w0 @ (g.T @ c)
            solved = uce_solve(w0, erase_values, erase_gram, preserve_gram, cfg)
            if cfg.incremental:
                state[key] = erase_values
                state[f"own_delta.{name}"] = solved - w0
                solved = solved + other_edits(weight, w0, memory.get(f"own_delta.{name}"))
            deltas[name] = solved.to(weight.dtype) - weight
        return MethodResult(Edit(deltas=deltas), state, {"erase_tokens": len(c), "edited_layers": len(deltas),
                                                         "unet_forward_passes": 0, "unet_backward_passes": 0})
