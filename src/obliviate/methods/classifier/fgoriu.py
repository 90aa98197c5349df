"""FG-OrIU (feature-gradient orthogonality for incremental unlearning, ICCV 2025).

For every weight layer (``nn.Linear``, ``nn.Conv2d``; a convolution's inputs are its unfolded
patches) the SVD of its inputs gives a *remaining* subspace U_r (inputs on retained data) and a
*forgetting* subspace U_f (inputs on the forget set), each keeping the directions that hold
``energy`` of the squared singular values.

- Feature level: the forget set's penultimate features are driven orthogonal to the head-input
  subspaces of both the retained and the forget data, ``L = |[U_r U_f]^T phi(x_f)|^2 /
  |phi_0(x_f)|^2``, so little the head reads is left of them.
- A feature-distillation term on retained data catches what the energy threshold lets through.
- Emptied features leave the head's bias to decide; for class requests the forgotten class's
  bias is lowered just enough that it no longer wins on the forget set (only its own logit
  moves, so no retained prediction can flip to it).
- Gradient level: every weight gradient is projected as ``G <- G (I - B B^T)`` with B spanning
  U_r and the forgetting subspaces of earlier requests, so retained inputs keep their outputs
  and earlier forgotten data cannot be pulled back. The forgetting subspace is taken from the
  forget set's inputs after the update, i.e. where forgetting left them.
- Dynamic subspace adaptation: the forgetting bases are merged across requests and the
  remaining bases contracted (recomputed on the shrinking retained data, then with every
  forgetting direction removed); both live in the store's method state.

Only weight matrices train (and the head bias, for the correction above): a bias or LayerNorm change
would shift retained outputs too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class FGOrIUConfig(ClassifierConfig):
    epochs: int = field(default=10, metadata={"help": "passes over the forget set"})
    learning_rate: float = field(default=0.05, metadata={"help": "SGD learning rate"})
    energy: float = field(default=0.97, metadata={"help": "share of squared singular values a subspace keeps"})
    samples: int = field(default=512, metadata={"help": "examples (or patches per layer) used to estimate subspaces"})
    retain_weight: float = field(default=1.0, metadata={"help": "weight of keeping retained features where they were (0: projection only)"})
    feature_energy: float = field(default=0.95, metadata={"help": "energy of the head-input subspaces the forget features must leave"})
    trainable: str = field(default=r"weight$|^head\.bias$", metadata={
        "help": "regex over parameter names (weight matrices, and the head's bias for the class correction)"})

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.energy <= 1 and 0 < self.feature_energy <= 1):
            raise ValueError(f"energy and feature_energy must lie in (0, 1], got {self.energy} and {self.feature_energy}")


def energy_basis(rows: torch.Tensor, energy: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal (dim, k) basis of the span of ``rows`` (n, dim) keeping ``energy`` of the
    spectrum, after removing the directions in ``exclude``."""
    matrix = rows.double().T
    if exclude is not None and exclude.shape[1]:
        matrix = matrix - exclude @ (exclude.T @ matrix)
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] <= 1e-12:
        return torch.zeros(matrix.shape[0], 0, dtype=torch.float64)
    share = (s ** 2).cumsum(0) / (s ** 2).sum()
    k = int((share < energy).sum().item()) + 1
    return u[:, :k]


def merge_bases(*bases: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the union of spans."""
    stacked = torch.cat([b for b in bases if b.shape[1]], dim=1) if any(b.shape[1] for b in bases) else bases[0]
    if stacked.shape[1] == 0:
        return stacked
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    return u[:, s > tol * s[0]]


def weight_layers(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def layer_inputs(net: nn.Module, x: torch.Tensor, samples: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each weight layer's inputs on ``x`` as rows (n, fan_in), subsampled to ``samples`` rows."""
    rows, handles = {}, []

    def keep(name, module):
        def hook(_, args, __):
            inp = args[0]
            if isinstance(module, nn.Conv2d):
                inp = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            inp = inp.reshape(-1, inp.shape[-1])
            pick = torch.randperm(len(inp), generator=generator)[:samples].to(inp.device)
            rows[name] = inp[pick].cpu()
        return hook

    for name, module in weight_layers(net).items():
        handles.append(module.register_forward_hook(keep(name, module)))
    try:
        net(x[torch.randperm(len(x), generator=generator)[:samples].to(x.device)])
    finally:
        for h in handles:
            h.remove()
    return rows


@register_method
class FGOrIU(ClassifierMethod):
    name = "fgoriu"
    description = "FG-OrIU: feature and gradient orthogonal projection with subspaces that adapt across requests"
    config_class = FGOrIUConfig

    def run(self, session):
        cfg = self.config
        layers = weight_layers(session.net)
        head = _head_name(session.net, layers)
        weights = {n: layers[n].weight for n in layers if layers[n].weight.requires_grad}
        if not set(weights) - {head}:
            raise ValueError("fgoriu changes the features the head reads, so some weight below the head must train; "
                             f"trainable={cfg.trainable!r} selects none.")
        retain = layer_inputs(session.net, session.retain_x, cfg.samples, session.generator)
        forget = layer_inputs(session.net, session.forget_x, cfg.samples, session.generator)
        previous, remaining, complements = {}, {}, {}
        for name in layers:
            stored = session.context.state.get(f"forget/{name}")
            previous[name] = stored.double() if stored is not None else torch.zeros(retain[name].shape[1], 0, dtype=torch.float64)
            # contract: directions forgotten by earlier requests leave the remaining subspace
            remaining[name] = energy_basis(retain[name], cfg.energy, exclude=previous[name])
            protected = merge_bases(remaining[name], previous[name])
            complements[name] = (torch.eye(protected.shape[0], dtype=torch.float64) - protected @ protected.T).float()

        # feature level: the forget set's features must leave the head-input subspaces of both
        # the retained and the forgotten data
        head_remaining = energy_basis(retain[head], cfg.feature_energy)
        feature_basis = merge_bases(head_remaining, energy_basis(forget[head], cfg.feature_energy, exclude=head_remaining))
        device = session.forget_x.device
        feature_basis = feature_basis.float().to(device)
        with torch.no_grad():
            scale = session.teacher.features(session.forget_x).pow(2).sum(1).mean().clamp_min(1e-8)
        hooks = [w.register_hook(lambda g, c=complements[n].to(device), w=w: _project(g, c, w)) for n, w in weights.items()]
        try:
            for _ in range(cfg.epochs):
                for x, _ in session.batches(session.forget_x, session.forget_y):
                    features = session.net.features(x)
                    loss = (features @ feature_basis).pow(2).sum(1).mean() / scale
                    if cfg.retain_weight:
                        kept_x, _ = session.random_batch(session.retain_x, session.retain_y)
                        with torch.no_grad():
                            kept = session.teacher.features(kept_x)
                        loss = loss + cfg.retain_weight * (session.net.features(kept_x) - kept).pow(2).sum(1).mean() / scale
                    session.counter.forward += 2 if cfg.retain_weight else 1
                    session.step(loss)
        finally:
            for h in hooks:
                h.remove()

        if "head.bias" in session.params:
            _lower_forgotten_class_bias(session, layers[head])

        # merge: the forget set's inputs *after* forgetting join the forgetting subspace, so later
        # requests keep them where this one put them instead of pulling the knowledge back
        forgotten_inputs = layer_inputs(session.net, session.forget_x, cfg.samples, session.generator)
        state = {}
        for name in layers:
            new = energy_basis(forgotten_inputs[name], cfg.energy)
            state[f"forget/{name}"] = merge_bases(previous[name], new).float()
            state[f"remain/{name}"] = remaining[name].float()
        return state


def _head_name(net: nn.Module, layers: dict[str, nn.Module]) -> str:
    for name, module in layers.items():
        if module is getattr(net, "head", None):
            return name
    raise ValueError("fgoriu needs a network with a linear `head` reading the features.")


@torch.no_grad()
def _lower_forgotten_class_bias(session, head: nn.Linear, margin: float = 1.0) -> None:
    """Emptied features leave the head's bias to decide, and it may favour a forgotten class
    itself. Lower each forgotten class's bias just enough that no forget example still
    scores it highest; only that class's logit moves, so no retained prediction can flip to it."""
    targets = session.context.prompts
    features = session.net.features(session.forget_x)
    for c in targets.classes(tuple(session.request.targets)):
        logits = head(features[session.forget_y == c])
        others = torch.cat([logits[:, :c], logits[:, c + 1:]], dim=1).max(1).values
        excess = (logits[:, c] - others).max()
        if excess > -margin:
            head.bias[c] -= excess + margin


def _project(gradient: torch.Tensor, complement: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Right-multiply a weight gradient by the complement projector (conv kernels as matrices)."""
    flat = gradient.reshape(gradient.shape[0], -1)
    return (flat @ complement).reshape(weight.shape)
