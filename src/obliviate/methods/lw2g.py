"""LW2G on SuPLoRA's adapters: each request decides to share an existing group or grow a new one.

Every group s keeps U_s, an orthonormal basis of the input features (token states of its
requests' forget prompts) it has learned on, grown GPM-style to hold ``feature_energy`` of each
new request's features. For a new request with gradient g (rows: the K/V weights' gradient of its
erasure loss, at the model it starts from), the Hinder Forward Capability of group s is the angle
between g and its projection on the group's old features,

    HFC_s = degrees(arccos(mean_rows cos(g_i, g_i U_s U_s^T))),

and the dynamic threshold is the same angle against U_pre, the basis of features the pretrained
model serves (retained prompts' token states). A large HFC means the request's gradient lies
mostly outside what the group already knows, so learning it there hinders little:
``max_s HFC_s > threshold`` shares s* = argmax HFC_s with the hard projection (the request's new
down-projection rows stay out of U_s*, and the group's earlier up-projection columns stay fixed,
so the update is zero on U_s*); otherwise it grows a new group. The decision, the HFC values and
the threshold go into the request's ledger row.

LW2G also damps every gradient's component in U_pre by 10%; an adapter whose down-projection is
frozen has no such gradient, so that step is not taken here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..training import token_states
from .base import register_method
from .suplora import GroupChoice, SupLoRA, SupLoRAConfig

PREFIX = "lw2g."


@dataclass
class LW2GConfig(SupLoRAConfig):
    feature_energy: float = field(default=0.95, metadata={"help": "share of each request's feature energy its group's basis holds"})
    gradient_images: int = field(default=4, metadata={"help": "images the frozen model draws for the decision's gradient"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.feature_energy < 1:
            raise ValueError(f"feature_energy must be in (0, 1), got {self.feature_energy}")
        if self.gradient_images <= 0:
            raise ValueError(f"gradient_images must be positive, got {self.gradient_images}")


def grow_basis(basis: torch.Tensor, features: torch.Tensor, energy: float) -> torch.Tensor:
    """``basis`` (d x k, orthonormal) extended by the fewest directions of ``features`` (n x d)
    outside it such that the basis holds ``energy`` of the features' squared norm (GPM's rule)."""
    features = features.double()
    total = float(features.pow(2).sum())
    residual = features - features @ basis @ basis.T
    held = total - float(residual.pow(2).sum())
    if total == 0 or held >= energy * total:
        return basis
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    need = int(torch.searchsorted(torch.cumsum(s**2, 0), torch.tensor(energy * total - held, dtype=s.dtype))) + 1
    new = vh[:need] - (vh[:need] @ basis) @ basis.T
    return torch.cat([basis, torch.linalg.qr(new.T).Q], 1)


def hinder_angle(gradients: list[torch.Tensor], basis: torch.Tensor) -> float:
    """degrees(arccos(mean row cosine of g and g U U^T)) over every row of every gradient."""
    cosines = []
    for g in gradients:
        g = g.double()
        projected = g @ basis @ basis.T
        live = g.norm(dim=1) > 0  # a zero row has no direction; a row with no projection has cosine 0
        cosines.append(((g * projected).sum(1) / (g.norm(dim=1) * projected.norm(dim=1)).clamp_min(1e-300))[live])
    rows = torch.cat(cosines) if cosines else torch.zeros(0)
    mean = float(rows.mean()) if len(rows) else 0.0
    return math.degrees(math.acos(max(-1.0, min(1.0, mean))))


@register_method
class LW2G(SupLoRA):
    name = "lw2g"
    description = "SuPLoRA adapters grouped by LW2G: share the group the request hinders least, or grow a new one"
    config_class = LW2GConfig

    def erasure_gradient(self, model, request, context, layers: list[str]) -> list[torch.Tensor]:
        """The K/V weights' gradient of the ablation loss (target prompts predicting like their
        anchors) on images of the anchors the model draws, one per adapted layer."""
        cfg = self.config
        rng = np.random.default_rng([request.seed, 2])
        pairs = context.prompts.forget_pairs(tuple(request.targets), request.anchor, cfg.gradient_images, rng,
                                             avoid=self.avoided(context))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        weights = [model.unet.get_submodule(layer).weight for layer in layers]
        with torch.no_grad():
            images = model.sample([p.anchor for p in pairs], steps=cfg.sampling_steps, seed=int(rng.integers(2**31)))
            clean = model.to_latents(images, generator=generator)
            noise = torch.randn(clean.shape, generator=generator).to(clean)
            t = model.sample_timesteps(len(clean), generator)
            noisy = model.scheduler.add_noise(clean, noise, t)
            goal = model.predict(noisy, t, model.encode([p.anchor for p in pairs]))
        for w in weights:
            w.requires_grad_(True)
        try:
            loss = (model.predict(noisy, t, model.encode([p.target for p in pairs])) - goal).pow(2).mean()
            gradients = torch.autograd.grad(loss, weights)
        finally:
            for w in weights:
                w.requires_grad_(False)
        return [g.detach().cpu() for g in gradients]

    def choose_group(self, model, request, context, layers: list[str]) -> GroupChoice:
        cfg = self.config
        groups = sorted({k.split("/")[0] for k in context.state if k.startswith("group." + PREFIX)},
                        key=lambda k: int(k.rsplit(".", 1)[1]))
        rng = np.random.default_rng([request.seed, 3])
        with torch.no_grad():
            kept = token_states(model, context.prompts.retain_prompts(context.forgotten + tuple(request.targets), 64, rng)
                                or [""])
            pretrained = grow_basis(torch.zeros(kept.shape[1], 0, dtype=torch.float64), kept, cfg.feature_energy)
        gradients = self.erasure_gradient(model, request, context, layers)
        threshold = hinder_angle(gradients, pretrained)
        angles = {key[len("group."):]: hinder_angle(gradients, context.state[f"{key}/features"]) for key in groups}
        stats = {"hfc": {k: round(v, 3) for k, v in angles.items()}, "hfc_threshold": round(threshold, 3)}
        supertype = cfg.group or context.prompts.supertype_of(tuple(request.targets))
        if angles and max(angles.values()) > threshold:
            best = max(angles, key=angles.get)
            return GroupChoice(best, supertype, avoid=context.state[f"group.{best}/features"], train_old_columns=False,
                               stats={**stats, "decision": f"share {best}"})
        name = f"{PREFIX}{len(groups)}"
        return GroupChoice(name, supertype, stats={**stats, "decision": f"grow {name}"})

    def group_state(self, key: str, state: dict[str, torch.Tensor], concept: torch.Tensor) -> dict[str, torch.Tensor]:
        old = state.get(f"{key}/features", torch.zeros(concept.shape[1], 0, dtype=torch.float64))
        return {f"{key}/features": grow_basis(old, concept, self.config.feature_energy)}
