"""The composition contract of the gradient loop.

Everything that restricts how a parameter may move is a *constraint*, and every constraint is a
linear subspace of updates:

- a mask M (same shape as the parameter, 0/1): the update is zero where M is 0;
- protected inputs U (in_features x k, orthonormal): for a weight W (out x in) the update D
  satisfies D U = 0, so W u is unchanged for every u in span(U).

The loop never applies constraints one after another (the result of a sequence of projections
depends on their order and satisfies only the last one). It intersects them: masks multiply,
protected bases are joined into one orthonormal basis, and one projector per parameter maps an
update onto the intersection, orthogonally. For row i of the update with mask row m_i,

    P(g)_i = h_i - m_i * U G_i^+ U^T h_i,    h_i = m_i * g_i,    G_i = U^T diag(m_i) U

which is zero off the mask and orthogonal to U (the rows where m_i = 1 everywhere reduce to the
familiar g_i (I - U U^T)). Intersection is commutative, so listing regularizers in another order
cannot change what holds. Penalties add to the loss; merges rewrite the finished edit and run
last, after which the projector is applied once more so the constraints hold on the edit itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .subspace import orthonormal_basis


@dataclass(frozen=True)
class ParameterConstraint:
    """What one constraint allows for one parameter; ``source`` names who declared it."""

    source: str
    mask: torch.Tensor | None = None
    protected: torch.Tensor | None = None  # (in_features, k) orthonormal columns

    def __post_init__(self):
        if self.mask is None and self.protected is None:
            raise ValueError(f"{self.source}: a constraint needs a mask, a protected basis or both.")


class UpdateProjector:
    """The orthogonal projection of one parameter's update onto the intersection of its
    constraints (see the module docstring). Idempotent; the identity when nothing constrains."""

    def __init__(self, shape: torch.Size, constraints: list[ParameterConstraint]):
        self.sources = tuple(sorted({c.source for c in constraints}))
        masks = [c.mask for c in constraints if c.mask is not None]
        bases = [c.protected for c in constraints if c.protected is not None]
        self.mask = None
        if masks:
            mask = torch.ones(shape)
            for m in masks:
                if m.shape != shape:
                    raise ValueError(f"{self.sources}: a mask of shape {tuple(m.shape)} for a parameter of shape {tuple(shape)}.")
                mask = mask * m.detach().float().cpu()
            self.mask = mask
        self.basis = None
        self.whitening = None
        if bases:
            if len(shape) != 2 or any(b.shape[0] != shape[1] for b in bases):
                raise ValueError(f"{self.sources}: protected inputs of dimension {[b.shape[0] for b in bases]} "
                                 f"for a parameter of shape {tuple(shape)}; only (out, in) weights take them.")
            joined = torch.cat([b.detach().double().cpu() for b in bases], 1)
            # bases may be declared in float32, where a direction two of them share differs by
            # ~1e-7: a tighter cut counts it twice and protects a direction that should stay free
            self.basis = orthonormal_basis(joined, joined.shape[1], rtol=1e-6)
            if self.mask is not None:
                # G_i = U^T diag(m_i) U = V L V^T per row; W_i = V L^-1/2 makes diag(m_i) U W_i an
                # orthonormal basis of the row's constrained directions, so G_i^+ = W_i W_i^T is
                # applied as two well-conditioned products. Directions with singular value below
                # 1e-6 (the mask leaves almost nothing of them) are treated as unconstrained.
                gram = torch.einsum("dk,rd,dl->rkl", self.basis, self.mask.double(), self.basis)
                values, vectors = torch.linalg.eigh(gram)
                scale = torch.where(values > 1e-12, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
                self.whitening = vectors * scale[:, None, :]

    @property
    def is_identity(self) -> bool:
        return self.mask is None and self.basis is None

    def __call__(self, update: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return update
        h = update if self.mask is None else update * self.mask.to(update)
        if self.basis is None:
            return h
        # float64: the masked case divides by small singular values
        h64, basis = h.double(), self.basis.to(h.device)
        coefficients = h64 @ basis  # (out, k)
        if self.whitening is None:
            return (h64 - coefficients @ basis.T).to(update.dtype)
        whitening = self.whitening.to(h.device)
        solved = torch.einsum("rkl,rl->rk", whitening, torch.einsum("rkl,rk->rl", whitening, coefficients))
        return (h64 - self.mask.to(h64) * (solved @ basis.T)).to(update.dtype)


def combine_constraints(shapes: dict[str, torch.Size],
                        declared: list[dict[str, ParameterConstraint]]) -> dict[str, UpdateProjector]:
    """One projector per parameter from every declarer's ``{parameter: constraint}``; parameters
    no one constrains are left out. A constraint on a parameter that does not train is refused."""
    per_param: dict[str, list[ParameterConstraint]] = {}
    for constraints in declared:
        for name, constraint in constraints.items():
            if name not in shapes:
                raise ValueError(f"{constraint.source} constrains {name!r}, which does not train in this request.")
            per_param.setdefault(name, []).append(constraint)
    return {name: UpdateProjector(shapes[name], cs) for name, cs in sorted(per_param.items())}
