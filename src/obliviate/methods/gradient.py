"""The one training loop every gradient method runs on.

A gradient method says which parameters train (a regex over UNet parameter names, like peft's
``target_modules``) and what the loss of one step is; the loop does the rest: the frozen
teacher, the forget images, the optimizer (through accelerate, so one CPU or many GPUs run the
same code), the regularizers under the composition contract (``obliviate.training.contract``),
pass counting, progress.

One optimizer step, in order: the loss plus every penalty; backward; the gradient rectified by
the one regularizer that may rewrite it, if any; the gradient projected onto the intersection of
all constraints (the method's, the regularizers' and, for one stage, the stage's mask); the
optimizer step; the request's accumulated update projected onto the intersection of the
request's constraints. After the last step a regularizer that rewrites the edit (merging) runs,
and the request's constraints are applied to its result. With ``lora_rank`` the update of each
trained weight is a low-rank adapter: one more constraint, chosen inside the others before the
first step, or (``lora_fit=svd``) the best rank-r approximation of the dense update, taken after
the last; the edit stores its factors (``obliviate.training.adapter``).
"""

from __future__ import annotations

import copy
import json
from abc import abstractmethod
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator

from ..regularizers import Regularizer, check_composition, get_regularizer
from ..training import (ParameterConstraint, PassCounter, TrainingSession, UpdateProjector, accumulate_gradients,
                        adapter_constraints, adapter_factors, combine_constraints, gradient_directions, match_names,
                        refuse_masks, select_parameters, update_directions)
from ..world import PromptPair
from .base import Edit, MethodResult, UnlearningContext, UnlearningMethod


ADAPTER_BATCHES = 4  # batches whose gradients choose a lora_rank adapter's down-projection


class GradientMethod(UnlearningMethod):
    """Base of every gradient method: implement ``loss``; optionally ``setup``, ``constraints``
    and ``stages``."""

    uses_teacher: bool = True
    accepts_regularizers = True
    # without an anchor, a random retained concept takes the target's place in the same prompt
    # (SalUn's random label, SafeGen's substitute) rather than the prompt just dropping it
    random_anchors: bool = False

    def setup(self, session: TrainingSession) -> None:
        """Called once before training (e.g. to compute masks or pick random targets)."""

    def constraints(self, session: TrainingSession) -> dict[str, ParameterConstraint]:
        """Constraints on the request's whole update (e.g. a saliency mask), read after ``setup``."""
        return {}

    @abstractmethod
    def loss(self, session: TrainingSession) -> torch.Tensor:
        """The method's loss for one step."""

    def stages(self, session: TrainingSession) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
        """The optimizer steps of one iteration, as (loss, mask of this stage's gradient or None).
        Most methods take one; alternating methods (SFR-on) yield a forget and a retain stage, and
        each loss is computed only after the previous stage's step. A stage mask restricts that
        stage's gradient only; constraints that hold for the whole request come from
        ``constraints``."""
        yield self.loss(session), None

    def image_prompts(self, session: TrainingSession) -> list[str]:
        """Prompts whose images serve as x_0: the targets' by default (data-free, as in ESD)."""
        return session.forget_prompts

    def forget_pairs(self, session: TrainingSession, n: int) -> list[PromptPair]:
        """The forget prompts and their anchors: the request's anchor in the target's place, or
        else the prompt without the target (a random retained concept in its place, with
        ``random_anchors`` or the ``swap_anchors`` option; the option never puts a concept
        forgotten earlier there); ``partial_prompts`` of the other attributes left out of both."""
        avoid, anchor = self.avoided(session.context), session.request.anchor
        if self.random_anchors and not anchor and not session.config.swap_anchors:
            # salun and safegen drew from every other concept before the option existed; they still do
            return session.prompts.random_anchor_pairs(session.targets, n, session.rng, avoid=avoid,
                                                       partial=session.config.partial_prompts)
        return session.anchored_pairs(session.targets, n, avoid, anchor)

    def avoided(self, context: UnlearningContext) -> tuple[str, ...]:
        """Concepts the forget prompts leave out: with ``avoid_forgotten``, those earlier requests
        forgot. The teacher predicts them erased, and ESD's target ``f* - eta (f* - f*_anchor)``
        mirrors any difference between their erasure under prompt and anchor; why it is off by
        default: benchmarks/adapters/s10-final.md, "Prompts that show a concept forgotten earlier"."""
        return context.forgotten if self.config.avoid_forgotten else ()

    def draw_forget_latents(self, session: TrainingSession) -> torch.Tensor:
        """The x_0 latents of the forget batches: images the frozen model draws for ``image_prompts``."""
        return session.draw_latents(self.image_prompts(session)[:session.config.forget_images])

    def check_parameters(self, names) -> None:
        match_names(names, self.config.trainable_regex)

    def trainable_pattern(self) -> str:
        """The regex over UNet parameter names that selects what trains (``trainable`` by
        default; an adapter method names its adapter's weights)."""
        return self.config.trainable_regex

    def unlearn(self, model, request, context: UnlearningContext) -> MethodResult:
        config = self.config
        check_composition([spec.name for spec in request.regularizers])
        # A canonical order: penalties sum and setups draw from the request's random streams in
        # the same order whatever order the user listed the regularizers in.
        specs = sorted(request.regularizers, key=lambda s: (s.name, json.dumps(s.config, sort_keys=True)))
        # limits were checked (or lifted on purpose) when the request was added
        regularizers: list[Regularizer] = [get_regularizer(spec.name).from_options(spec.config, limits=False) for spec in specs]

        start = next((w for reg in regularizers if (w := reg.start_weights(context)) is not None), None)
        current = model.state_tensors() if start is not None else None
        if start is not None:
            model.load_state_tensors(start)

        accelerator = Accelerator(cpu=context.device.type == "cpu")
        model.to(accelerator.device)
        model.unet.requires_grad_(False)
        params = select_parameters(model.unet, self.trainable_pattern())
        for p in params.values():
            p.requires_grad_(True)
        before = {n: p.detach().clone() for n, p in params.items()}
        teacher = None
        if self.uses_teacher:
            # the teacher shares every weight training leaves alone: a copy of the trained ones only
            frozen = {id(p): p for n, p in model.unet.named_parameters() if n not in params}
            teacher = copy.copy(model)
            teacher.unet = copy.deepcopy(model.unet, memo=frozen).requires_grad_(False).eval()
        counter = PassCounter(*(m.unet for m in (model, teacher) if m is not None))
        session = TrainingSession(model, teacher, request, context, config, params,
                                  np.random.default_rng(request.seed), torch.Generator().manual_seed(request.seed),
                                  counter, objective=self.loss)
        try:
            pairs = self.forget_pairs(session, max(64, config.forget_images))
            session.forget_prompts = [p.target for p in pairs]
            session.anchor_prompts = [p.anchor for p in pairs]
            session.forget_latents = self.draw_forget_latents(session)
            for reg in regularizers:
                reg.setup(session)
            self.setup(session)
            shapes = {n: p.shape for n, p in params.items()}
            declared = [self.constraints(session)] + [reg.constraints(session) for reg in regularizers]
            projectors = combine_constraints(shapes, declared)
            downs, fit = {}, config.lora_fit if config.lora_rank else None
            if fit == "svd":
                refuse_masks(projectors)
            elif fit == "trained":  # the adapter is one more constraint, inside all the others
                gradients = [accumulate_gradients(params, lambda: self.loss(session), 1, on_backward=counter.count_backward)
                             for _ in range(ADAPTER_BATCHES)]
                downs = gradient_directions(gradients, projectors, config.lora_rank)
                declared.append(adapter_constraints(downs))
                projectors = combine_constraints(shapes, declared)
            losses = self._train(session, accelerator, regularizers, projectors, declared, before)
        finally:
            counter.close()
        model.unet.requires_grad_(False)

        deltas = {n: (p.detach() - before[n]).cpu() for n, p in params.items()}
        for reg in regularizers:
            if reg.rewrites_edit:
                deltas = {n: projectors[n](d) if n in projectors else d for n, d in reg.finalize(session, deltas).items()}
        # restore the model: the store applies the edit itself, so replay stays the only truth
        if current is not None:  # trained from other weights (start_weights): put the whole model back
            model.load_state_tensors(current)
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(before[n])
        if fit == "svd":  # the best rank-r approximation of what trained
            downs = update_directions(deltas, config.lora_rank)
        factors, kept = {}, []
        for n, down in downs.items():
            delta = deltas.pop(n)
            if torch.count_nonzero(delta):
                up, down = adapter_factors(delta, down)
                factors[f"unet.{n}"] = (up, down)
                kept.append(float(up.double().pow(2).sum() / delta.double().pow(2).sum()))
        deltas = {f"unet.{n}": d for n, d in deltas.items() if torch.count_nonzero(d)}
        regularizer_states = {reg.name: reg.state() for reg in regularizers if reg.state()}
        stats = {"unet_forward_passes": counter.forward, "unet_backward_passes": counter.backward,
                 "steps": config.steps, "processes": accelerator.num_processes, "final_loss": losses[-1] if losses else None,
                 "first_loss": losses[0] if losses else None,
                 "trained_parameters": sum(p.numel() for p in params.values()),
                 "constrained_parameters": sum(params[n].numel() for n, pr in projectors.items() if not pr.is_identity)}
        if kept:
            stats["adapter_rank"] = max(len(d) for _, d in factors.values())
            stats["adapter_energy_kept"] = min(kept)  # share of the trained update the adapter holds, worst layer
        return MethodResult(Edit(deltas=deltas, factors=factors), {}, stats, regularizer_states)

    def _train(self, session: TrainingSession, accelerator: Accelerator, regularizers: list[Regularizer],
               projectors: dict[str, UpdateProjector], declared: list[dict[str, ParameterConstraint]],
               start: dict[str, torch.Tensor]) -> list[float]:
        params, model = session.params, session.model
        processes = accelerator.num_processes
        if session.config.batch_size % processes:
            raise ValueError(f"batch_size {session.config.batch_size} does not split over {processes} processes; "
                             f"choose a multiple of {processes} (--set batch_size=...).")
        stage_projectors: dict[int, dict[str, UpdateProjector]] = {}
        rectifiers = [reg for reg in regularizers if reg.rewrites_gradient]
        optimizer = torch.optim.Adam(list(params.values()), lr=session.config.learning_rate)
        model.unet, optimizer = accelerator.prepare(model.unet, optimizer)
        model.unet.train()
        session.shard = (accelerator.process_index, processes)  # setup above saw whole batches, as alone
        losses = []
        try:
            for step in range(session.config.steps):
                session.step = step
                for loss, stage_mask in self.stages(session):
                    for reg in regularizers:
                        extra = reg.penalty(session)
                        if extra is not None:
                            loss = loss + extra
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    session.counter.count_backward()
                    for reg in rectifiers:
                        reg.rectify(session)
                    gradient_projectors = projectors
                    if stage_mask is not None:  # built once per distinct stage mask
                        if id(stage_mask) not in stage_projectors:
                            stage = {n: ParameterConstraint("stage", mask=m) for n, m in stage_mask.items()}
                            stage_projectors[id(stage_mask)] = combine_constraints(
                                {n: p.shape for n, p in params.items()}, declared + [stage])
                        gradient_projectors = stage_projectors[id(stage_mask)]
                    with torch.no_grad():
                        for n, projector in gradient_projectors.items():
                            if params[n].grad is not None:
                                params[n].grad.copy_(projector(params[n].grad))
                    optimizer.step()
                    with torch.no_grad():
                        for n in projectors:
                            p = params[n]
                            p.copy_(start[n] + projectors[n](p - start[n]))
                    losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))  # the whole batch's
                if session.context.progress:
                    session.context.progress(1, loss=round(losses[-1], 5))
        finally:
            session.shard = (0, 1)
            model.unet = accelerator.unwrap_model(model.unet).eval()
        return losses
