"""SuPLoRA: one LoRA per supertype group on the cross-attention keys and values, whose
down-projection cannot see the supertype.

For a group j (the targets' supertype, e.g. ``polygon`` for triangle; ``group=NAME`` for free
text) the adapted layer computes

    W' h = W h + U_j D_j h,   D_j (r x d_in) frozen, U_j (d_out x r) trained from zero,

where D_j's rows are an orthonormal basis of directions outside S_j, the span of the token states
of the prompts naming the supertype ("a polygon", "a polygon shape", ...), chosen where target
prompts' token states differ most from their anchors' (by default the same sentence with another
concept of the domain in the target's place: ``token_anchors``). So D_j s = 0 for every s in S_j: whatever
U_j learns, a supertype prompt's keys and values stay those of the model before the group's
adapter (to float rounding). A later request in the same group warm-starts it: D_j grows by up
to ``rank`` new rows, orthogonal to S_j and to its old rows, and U_j keeps its columns.

Later requests can wear an earlier erasure down: any group's new rows may read the earlier
target's token shift t - a. With ``hold_rank`` = k each request keeps the top k directions H of
its targets' shifts, every later request's new rows are orthogonal to all of them and its group's
earlier columns stay fixed, so D_new t = D_new a up to the part of the shift outside H: a later
adapter moves an earlier target's keys and values as it moves its anchor's.

U_j's new columns start at MACE's closed-form refinement restricted to D_j's rows (target token
states' outputs moved to their aligned anchors', retained ones kept; ``closed_form_up``), then
train with concept ablation's objective (target prompts reproduce the frozen model's anchor
predictions, on the frozen model's anchor images) plus ``retain_weight`` times the same match on
retained prompts and on earlier requests' target prompts (``keep_forgotten``). The paper's MACE-style loss (cross-attention maps inside the concept's mask)
needs masks of the images trained on; this loss needs none, so it runs on any store.

The served model is the base plus every group's adapter, summed (the paper fuses groups in closed
form); each request's edit holds only its group's change, as factors (U_delta, D_j), and the
method state holds each group's S_j, D_j and U_j.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..training import (GradientConfig, ParameterConstraint, TrainingSession, aligned_token_states, match_names,
                        orthonormal_basis, protected_basis, token_states)
from .base import Edit, MethodResult, register_method
from .gradient import GradientMethod

ADAPTER = "suplora"
HELD = "held/shift"  # method state: the directions ``hold_rank`` keeps later requests' new rows out of
PROTECT_PROMPTS = 64  # of the targets' siblings, and as many of other retained concepts


@dataclass
class SupLoRAConfig(GradientConfig):
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=5e-3, metadata={"help": "Adam learning rate of the up-projection"})
    trainable: str = field(default="xattn-kv", metadata={
        "help": "layers that get the group's LoRA: a preset or a regex over UNet parameter names (their .weight)"})
    rank: int = field(default=32, metadata={
        "help": "down-projection rows each request adds to its group's adapter (colours need about 32 on shapes-t2i; shapes and textures fewer)"})
    group: str = field(default="", metadata={"help": "the adapter group; default: the targets' supertype (free text must name one)"})
    retain_weight: float = field(default=1.0, metadata={"help": "weight of the retained prompts' prediction match"})
    keep_forgotten: bool = field(default=True, metadata={
        "help": "earlier requests' target prompts join the retained ones, so their (already erased) predictions are kept"})
    protect_rank: int = field(default=0, metadata={
        "help": "directions of retained prompts' token states (half of them naming the targets' siblings) the new rows stay "
                "out of, after the targets' own top ``target_rank`` directions are taken out (gradproj's protection); "
                "0: the supertype's only (48 measured worse over s10 on shapes-t2i)"})
    target_rank: int = field(default=8, metadata={"help": "the targets' own directions kept out of that protection"})
    token_anchors: str = field(default="same-template", metadata={
        "help": "anchors of the token-level steps (rows, closed-form start) when the request names none: 'same-template' "
                "puts a random other concept of the domain in the target's place; 'description' uses the training loss's "
                "anchor, the plain description, whose other wording moves every token state"})
    hold_rank: int = field(default=0, metadata={
        "help": "each forgotten target's top directions of how its prompts' token states differ from their anchors'; "
                "later requests' new rows stay out of them and their group's earlier columns stay fixed, so a later "
                "adapter moves an earlier target's keys and values as it moves its anchor's (0: off; 8 measured worse over s10 on "
                "shapes-t2i: dotted, blue and yellow no longer erase at their own request)"})
    closed_form_init: bool = field(default=True, metadata={
        "help": "start the up-projection at MACE's closed-form refinement within the adapter's rows (else at zero)"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if self.lora_rank:
            raise ValueError(f"{type(self).__name__} trains its own adapter (its size is `rank`); lora_rank must stay 0, "
                             f"got {self.lora_rank}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        if self.token_anchors not in ("same-template", "description"):
            raise ValueError(f"token_anchors must be 'same-template' or 'description', got {self.token_anchors!r}")
        if min(self.protect_rank, self.target_rank, self.hold_rank) < 0:
            raise ValueError(f"protect_rank, target_rank and hold_rank must be >= 0, got {self.protect_rank}, "
                             f"{self.target_rank} and {self.hold_rank}")


def extend_down(down: torch.Tensor, protected: torch.Tensor, shift: torch.Tensor, rank: int) -> torch.Tensor:
    """``down`` (r x d, orthonormal rows) with up to ``rank`` new rows appended: the top singular
    directions of ``shift`` (n x d: how token states move when a prompt names the concept)
    outside the span of ``protected`` (d x k columns, not necessarily orthonormal) and of ``down``."""
    d = protected.shape[0]
    seen = orthonormal_basis(torch.cat([protected.double(), down.double().T], 1), d, rtol=1e-9)
    outside = torch.eye(d, dtype=torch.float64) - seen @ seen.T
    _, s, vh = torch.linalg.svd(shift.double() @ outside, full_matrices=False)
    new = vh[:min(rank, int((s > 1e-6 * s[0]).sum()) if len(s) and s[0] > 0 else 0)]
    new = new - (new @ seen) @ seen.T  # exact complement, not just to the SVD's rounding
    new = torch.linalg.qr(new.T).Q.T if len(new) else new
    return torch.cat([down.double(), new]).float()


@dataclass(frozen=True)
class GroupChoice:
    """Which group's adapter a request trains. ``supertype`` names the prompts a new group's
    down-projection must not see; ``avoid`` (d_in x k) are further directions the request's new
    rows stay out of; with ``train_old_columns`` False the group's earlier up-projection columns
    stay fixed, so the request cannot change what the group's earlier rows read."""

    name: str
    supertype: str
    avoid: torch.Tensor | None = None
    train_old_columns: bool = True
    stats: dict = field(default_factory=dict)


def closed_form_up(weight: torch.Tensor, down: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor,
                   retained: torch.Tensor, retain_weight: float, ridge: float = 1e-3) -> torch.Tensor:
    """The up-projection U (d_out x r) that best moves target token states' outputs to their
    aligned anchors' while leaving retained ones where they are, within the rows of ``down``
    (MACE's closed-form refinement, restricted to the adapter):

        min_U sum_i |(W + U D) c_i - W a_i|^2 + retain_weight sum_j |U D r_j|^2 + ridge' |U|^2,

    ridge' = ``ridge`` times the mean diagonal of the normal matrix. U = W M^T with M from
    ``closed_form_map``, which does not depend on W."""
    return (weight.double() @ closed_form_map(down, concept, anchor, retained, retain_weight, ridge).T).float()


def closed_form_map(down: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor, retained: torch.Tensor,
                    retain_weight: float, ridge: float = 1e-3) -> torch.Tensor:
    """M (r x d_in) = N^-1 P^T (A - C), the normal equations of ``closed_form_up`` with the layer's
    weight factored out: P = C D^T (targets' states in the adapter's rows), N = P^T P +
    retain_weight R^T R + ridge', R = retained D^T. One solve serves every layer."""
    down = down.double()
    concept_rows, kept_rows = concept.double() @ down.T, retained.double() @ down.T
    normal = concept_rows.T @ concept_rows + retain_weight * kept_rows.T @ kept_rows
    normal = normal + ridge * normal.diagonal().mean().clamp_min(1e-12) * torch.eye(len(down), dtype=torch.float64)
    return torch.linalg.solve(normal, concept_rows.T @ (anchor.double() - concept.double()))


def _group_key(group: str) -> str:
    return "group." + re.sub(r"[^A-Za-z0-9+_.-]", "_", group)


def adapted_layers(unet: torch.nn.Module, pattern: str) -> list[str]:
    """The linear layers whose ``.weight`` the pattern matches."""
    names = [n for n, p in unet.named_parameters()]
    chosen = match_names(names, pattern)
    layers = [n[:-len(".weight")] for n in chosen if n.endswith(".weight")
              and isinstance(unet.get_submodule(n[:-len(".weight")]), torch.nn.Linear)]
    if not layers:
        raise ValueError(f"{pattern!r} selects no linear layer's weight; a LoRA needs linear layers (e.g. trainable=xattn-kv).")
    return layers


@register_method
class SupLoRA(GradientMethod):
    name = "suplora"
    description = "one LoRA per supertype group on K/V, its down-projection blind to the supertype's prompts (SuPLoRA)"
    config_class = SupLoRAConfig
    accepts_regularizers = False  # its protection is the frozen subspace; a weight-space regularizer sees other shapes

    _frozen_columns = 0  # up-projection columns a request may not move (set per request)
    _initial_up: dict[str, torch.Tensor] = {}  # where each layer's up-projection starts (set per request)

    def trainable_pattern(self) -> str:
        return rf"\.lora_B\.{ADAPTER}\."

    def group_state(self, key: str, state: dict[str, torch.Tensor], concept: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-group state a subclass keeps (LW2G: the group's feature basis)."""
        return {}

    def image_prompts(self, session: TrainingSession) -> list[str]:
        return session.anchor_prompts

    def loss(self, session: TrainingSession) -> torch.Tensor:
        batch = session.forget_batch()
        with torch.no_grad():
            goal = session.teacher.predict(batch.noisy, batch.t, session.encode(batch.anchors))
        loss = (session.model.predict(batch.noisy, batch.t, session.encode(batch.prompts)) - goal).pow(2).mean()
        if self.config.retain_weight:
            kept = session.retain_batch()
            with torch.no_grad():
                goal = session.teacher.predict(kept.noisy, kept.t, session.encode(kept.prompts))
            drift = (session.model.predict(kept.noisy, kept.t, session.encode(kept.prompts)) - goal).pow(2).mean()
            loss = loss + self.config.retain_weight * drift
        return loss

    def setup(self, session: TrainingSession) -> None:
        """Start the trained up-projections at the closed-form refinement (the teacher, made
        before this, keeps them at zero: it is the model the request started from), and add the
        earlier requests' target prompts to the retained ones: the frozen model's predictions for
        them are already erased, and the other groups' adapters must not undo that."""
        with torch.no_grad():
            for layer, up in self._initial_up.items():
                session.params[f"{layer}.lora_B.{ADAPTER}.weight"].copy_(up)
        earlier = session.context.forgotten
        if self.config.retain_weight and self.config.keep_forgotten and earlier:
            n = session.config.forget_images
            session.retain_prompt_list = session.retain_prompts(n) + [
                p.target for p in session.prompts.forget_pairs(earlier, None, n, session.rng)]
            session.retain_latents = session.draw_latents(session.retain_prompt_list)

    def choose_group(self, model, request, context, layers: list[str]) -> GroupChoice:
        """The group this request trains: its supertype, or the one the config names."""
        group = self.config.group or context.prompts.supertype_of(tuple(request.targets))
        return GroupChoice(group, group)

    def constraints(self, session: TrainingSession) -> dict[str, ParameterConstraint]:
        if not self._frozen_columns:
            return {}
        masks = {}
        for name, param in session.params.items():
            mask = torch.ones_like(param, device="cpu")
            mask[:, :self._frozen_columns] = 0
            masks[name] = ParameterConstraint(self.name, mask=mask)
        return masks

    def unlearn(self, model, request, context) -> MethodResult:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = self.config
        targets = tuple(request.targets)
        rng = np.random.default_rng([request.seed, 1])  # the training loop draws from the request seed's own stream
        layers = adapted_layers(model.unet, cfg.trainable_regex)
        choice = self.choose_group(model, request, context, layers)
        key = _group_key(choice.name)
        with torch.no_grad():
            protected = context.state.get(f"{key}/supertype")
            if protected is None:  # every direction the supertype prompts' token states have
                states = token_states(model, context.prompts.supertype_prompts(choice.supertype))
                protected = orthonormal_basis(states.T, states.shape[1], rtol=1e-6)
            old_down = context.state.get(f"{key}/down", torch.zeros(0, protected.shape[0]))
            # Token states are contextual: a pair in two wordings differs at every token, and rows read
            # from that shift move every prompt's keys and values (red's closed-form start moved other
            # colours' by 25% against red's 60%; in one wording 10% against 40%).
            if request.anchor or cfg.token_anchors == "description":
                pairs = context.prompts.forget_pairs(targets, request.anchor, 64, rng, avoid=self.avoided(context))
            else:
                pairs = context.prompts.random_anchor_pairs(targets, 64, rng, avoid=self.avoided(context))
            concept, anchor = aligned_token_states(model, [p.target for p in pairs], [p.anchor for p in pairs])
            avoid = [protected] + ([] if choice.avoid is None else [choice.avoid.double()])
            held = context.state.get(HELD) if cfg.hold_rank else None
            if held is not None:
                avoid.append(held)
            if cfg.protect_rank:  # like gradproj: the new rows cannot read retained prompts' main directions
                forgotten = context.forgotten + targets
                kept = token_states(model, context.prompts.related_prompts(targets, forgotten, PROTECT_PROMPTS, rng)
                                    + context.prompts.retain_prompts(forgotten, PROTECT_PROMPTS, rng) or [""])
                avoid.append(protected_basis(kept, concept - anchor, cfg.protect_rank, cfg.target_rank))
            avoid = torch.cat(avoid, 1)
            down = extend_down(old_down, avoid, concept - anchor, cfg.rank)
        train_old_columns = choice.train_old_columns and held is None
        if len(down) == len(old_down) and (len(down) == 0 or not train_old_columns):
            raise ValueError(f"Nothing to adapt for {request.label}: its prompts differ from their anchors only inside the "
                             f"directions group {choice.name!r} must not touch. Name another group (--set group=...) "
                             "or check the anchor.")
        self._frozen_columns = 0 if train_old_columns else len(old_down)
        self._initial_up = {}
        if cfg.closed_form_init:
            with torch.no_grad():
                kept = token_states(model, context.prompts.retain_prompts(context.forgotten + targets, 64, rng) or [""])
                start = closed_form_map(down[self._frozen_columns:], concept, anchor, kept, cfg.retain_weight)
                for layer in layers:
                    up = (model.unet.get_submodule(layer).weight.detach().cpu().double() @ start.T).float()
                    self._initial_up[layer] = torch.cat([torch.zeros(up.shape[0], self._frozen_columns), up], 1)

        rank = len(down)
        had_config = hasattr(model.unet, "peft_config")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=layers, lora_dropout=0.0),
                                model.unet, adapter_name=ADAPTER)
        try:
            with torch.no_grad():
                for layer in layers:
                    lora = model.unet.get_submodule(layer)
                    lora.lora_A[ADAPTER].weight.copy_(down.to(lora.lora_A[ADAPTER].weight))
                    lora.lora_B[ADAPTER].weight.zero_()
            result = super().unlearn(model, request, context)
        finally:
            for layer in layers:  # put the plain linear layers back: names and weights as before
                parent, _, child = layer.rpartition(".")
                holder = model.unet.get_submodule(parent)
                setattr(holder, child, getattr(holder, child).get_base_layer())
            if not had_config:
                del model.unet.peft_config

        state = dict(context.state)
        state[f"{key}/supertype"] = protected
        state[f"{key}/down"] = down
        factors = {}
        for layer in layers:
            change = result.edit.deltas.get(f"unet.{layer}.lora_B.{ADAPTER}.weight")
            old_up = state.get(f"{key}/up/{layer}", torch.zeros(model.unet.get_submodule(layer).out_features, 0))
            up = torch.cat([old_up, torch.zeros(old_up.shape[0], rank - old_up.shape[1])], 1)
            if change is not None:
                factors[f"unet.{layer}.weight"] = (change.contiguous(), down)  # one down, stored once
                up = up + change
            state[f"{key}/up/{layer}"] = up
        state.update(self.group_state(key, context.state, concept))
        if cfg.hold_rank:
            own = torch.linalg.svd((concept - anchor).double(), full_matrices=False).Vh[:cfg.hold_rank].T
            earlier = context.state.get(HELD, torch.zeros(own.shape[0], 0, dtype=torch.float64))
            state[HELD] = orthonormal_basis(torch.cat([earlier, own], 1), earlier.shape[1] + own.shape[1], rtol=1e-9)
        stats = {**result.stats, **choice.stats, "group": choice.name, "group_rank": rank, "new_directions": rank - len(old_down),
                 "protected_dimensions": protected.shape[1], "warm_start": bool(len(old_down))}
        return MethodResult(Edit(factors=factors), state, stats)
