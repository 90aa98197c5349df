"""Per-request low-rank adapters, as one more constraint of the contract.

A rank-r adapter on a weight W (out x in) is an update D = U A whose down-projection A (r x in,
orthonormal rows) is fixed and whose up-projection U trains: LoRA with a frozen down-projection
(LoRA-FA). Every row of D then lies in span(A), which is the contract's protected-input
constraint with the orthogonal complement of A's rows as the protected basis (D A_perp = 0). So
the loop trains the dense weight under that constraint, intersected with every other one, and
stores the finished update as its factors (D A^T, A): an adapter any gradient method and any
regularizer that constrains inputs (gradproj, fgoriu) can train.

A is where the request's own gradients point (LoRA-GA's start): the top r right singular
directions of the first gradients of the method's loss on a few batches, stacked, each projected
onto the other constraints first, so A already lies inside what they allow and the intersection
keeps all r directions.

The other fit (``lora_fit=svd``) trains the weights densely under the other constraints and keeps
the finished update's best rank-r approximation, D_r = D V_r^T V_r with V_r its top r right
singular vectors. Its rows lie in D's row space, so every protected-input constraint D Q = 0
still holds exactly; a mask would not, and is refused as for the trained fit.
"""

from __future__ import annotations

import torch

from .contract import ParameterConstraint, UpdateProjector
from .subspace import orthonormal_basis

SOURCE = "lora_rank"


def gradient_directions(gradients: list[dict[str, torch.Tensor]], projectors: dict[str, UpdateProjector],
                        rank: int) -> dict[str, torch.Tensor]:
    """A (r x in, float64 orthonormal rows, r <= ``rank``) for every 2-D parameter of
    ``gradients`` (one dict per batch): the top right singular directions of its gradients,
    each projected by its projector when it has one. Directions below 1e-8 of the largest
    singular value are dropped (a parameter the loss does not reach gets no rows)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    refuse_masks(projectors)
    downs = {}
    for name in gradients[0]:
        if gradients[0][name].dim() != 2:
            continue
        projector = projectors.get(name)
        # projected in float64: rows off the other bases to rounding, so joining those with the
        # adapter's complement adds no spurious direction that would eat the adapter's rows (no
        # mask here, so the projector acts row by row on the stacked rows)
        stacked = torch.cat([g[name].detach().double().cpu() for g in gradients])
        if projector is not None:
            stacked = projector(stacked)
        downs[name] = orthonormal_basis(stacked.T, rank, rtol=1e-8).T
    return downs


def update_directions(deltas: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The top ``rank`` right singular directions (float64 rows) of every 2-D update: the
    down-projection of its best rank-r approximation (``lora_fit=svd``)."""
    return {name: orthonormal_basis(delta.double().T, rank, rtol=1e-8).T
            for name, delta in deltas.items() if delta.dim() == 2 and torch.count_nonzero(delta)}


def refuse_masks(projectors: dict[str, UpdateProjector]) -> None:
    """A clear error when a mask constrains a weight matrix (its update would not be low-rank)."""
    for name, projector in projectors.items():
        if projector.mask is not None and projector.mask.dim() == 2:
            raise ValueError(f"lora_rank cannot train {name!r}: {', '.join(projector.sources)} masks it, and a masked "
                             "update is not low-rank. Drop lora_rank or the masking method/regularizer.")


def adapter_constraints(downs: dict[str, torch.Tensor]) -> dict[str, ParameterConstraint]:
    """Each parameter's update confined to the rows of its down-projection: the protected basis
    is the orthogonal complement of those rows."""
    constraints = {}
    for name, down in downs.items():
        # the full SVD's last in - r right singular vectors: exact, also for r = 0 (the identity) and r = in (none)
        complement = torch.linalg.svd(down, full_matrices=True).Vh[len(down):].T
        constraints[name] = ParameterConstraint(SOURCE, protected=complement)
    return constraints


def adapter_factors(delta: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = ``delta`` for an update whose rows lie in span(down)."""
    down = down.to(delta.device)
    return (delta.double() @ down.T).to(delta.dtype).contiguous(), down.to(delta.dtype).contiguous()
