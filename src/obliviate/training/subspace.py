"""Subspaces of what layers read: the one SVD basis helper, the text token states (plain, or
aligned position by position with an anchor prompt) the key/value bases are built from, and the
inputs any named linear layer receives in a UNet pass (the output projections' bases)."""

from __future__ import annotations

import re

import scipy.linalg
import torch


def orthonormal_basis(columns: torch.Tensor, rank: int, rtol: float = 0.0) -> torch.Tensor:
    """(dim, k) float64 orthonormal columns spanning the top-``rank`` left singular directions of
    ``columns`` (dim x count); directions whose singular value is at most ``rtol`` times the
    largest are dropped, so k <= rank."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    columns = columns.double()
    try:
        u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    except torch.linalg.LinAlgError:
        # torch's divide-and-conquer SVD can fail to converge on many repeated singular values
        # (bases that share directions, joined); LAPACK's QR-iteration driver does not
        u, s, _ = (torch.from_numpy(x).to(columns.device) for x in
                   scipy.linalg.svd(columns.cpu().numpy(), full_matrices=False, lapack_driver="gesvd"))
    keep = min(rank, u.shape[1])
    if rtol and len(s):
        keep = min(keep, int((s > rtol * s[0]).sum()))
    return u[:, :keep]


def protected_basis(states: torch.Tensor, own_shift: torch.Tensor | None, rank: int, own_rank: int) -> torch.Tensor:
    """(dim, k <= rank) orthonormal columns: the top directions of ``states`` (count x dim, token
    states of prompts to protect) once the top ``own_rank`` directions of ``own_shift`` (count x
    dim: how the targets' token states differ from their anchors; None when own_rank is 0) are
    removed from them, so a protection that spans the targets' own words still leaves them
    something to move."""
    states = states.double().T
    if own_rank and own_shift is not None and len(own_shift):
        own = orthonormal_basis(own_shift.double().T, own_rank, rtol=1e-8)
        states = states - own @ (own.T @ states)
    return orthonormal_basis(states, rank)


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


OUT_PATTERN = re.compile(r"attn2\.to_out\.0\.weight$")
MAX_ROWS = 8192  # positions kept per layer: bounds memory at Stable Diffusion's feature-map sizes


@torch.no_grad()
def projection_inputs(model, names: list[str], latents: torch.Tensor, t: torch.Tensor, encoding,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """What each named linear layer (``unet.<module>.weight``) receives in one UNet pass, one row
    per image position; at most ``MAX_ROWS`` of them, the same rows for the same ``seed`` and
    batch shape."""
    captured = {}

    def hook(name):
        def save(module, args):
            rows = args[0].reshape(-1, args[0].shape[-1])
            if len(rows) > MAX_ROWS:
                rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:MAX_ROWS]]
            captured[name] = rows.double().cpu()
        return save

    handles = [model.unet.get_submodule(name[len("unet."):-len(".weight")]).register_forward_pre_hook(hook(name))
               for name in names]
    try:
        model.predict(latents.to(model.device), t.to(model.device), encoding)
    finally:
        for handle in handles:
            handle.remove()
    return captured
