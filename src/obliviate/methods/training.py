"""The one training loop every gradient method runs on.

A gradient method says which parameters train (a regex over UNet parameter names, like peft's
``target_modules``) and what the loss of one step is; the loop does the rest: the frozen
teacher, the forget images, the optimizer (through accelerate, so one CPU or many GPUs run the
same code), regularizer hooks, pass counting, progress and early stopping.
"""

from __future__ import annotations

import copy
import re
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator

from ..models.text import TextEncoding
from .base import Edit, MethodResult, UnlearningContext, UnlearningMethod

# Named parameter groups of a diffusers UNet, as used by ESD's variants.
TRAINABLE_PRESETS = {
    "xattn": r"attn2\.",                      # every cross-attention parameter (esd-x)
    "xattn-kv": r"attn2\.(to_k|to_v)\.",      # cross-attention keys and values (esd-x-strict, UCE's layers)
    "non-xattn": r"^(?!.*attn2\.).*",         # everything outside cross-attention (esd-u)
    "all": r".*",
}


@dataclass
class GradientConfig:
    """Options every gradient method shares."""

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=8, metadata={"help": "prompts per step"})
    trainable: str = field(default="xattn", metadata={
        "help": f"parameters that train: a preset ({', '.join(TRAINABLE_PRESETS)}) or a regex over UNet parameter names"})
    forget_images: int = field(default=16, metadata={"help": "images of the targets drawn by the frozen model, reused as x_0"})
    sampling_steps: int = field(default=10, metadata={"help": "DDIM steps used to draw those images"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "forget_images", "sampling_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        try:
            re.compile(self.trainable_regex)
        except re.error as error:
            raise ValueError(f"trainable={self.trainable!r} is not a valid regex: {error}") from None

    @property
    def trainable_regex(self) -> str:
        return TRAINABLE_PRESETS.get(self.trainable, self.trainable)


def select_parameters(unet: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Parameter]:
    regex = re.compile(pattern)
    chosen = {n: p for n, p in unet.named_parameters() if regex.search(n)}
    if not chosen:
        raise ValueError(f"No UNet parameter matches {pattern!r}; names look like "
                         f"{next(iter(dict(unet.named_parameters())))!r}.")
    return chosen


class PassCounter:
    """Counts UNet forward calls (each batched call is one pass) through a forward hook."""

    def __init__(self, *modules: torch.nn.Module):
        self.forward = 0
        self.backward = 0
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.forward += 1

    def close(self):
        for h in self._handles:
            h.remove()


@dataclass
class TrainingSession:
    """Everything one request's training run can see; passed to method losses and regularizers."""

    model: object  # T2IModel being trained
    method: object  # the GradientMethod running (regularizers may ask it for its loss)
    teacher: object  # frozen copy of the model at the start of the request
    request: object
    context: UnlearningContext
    config: GradientConfig
    params: dict[str, torch.nn.Parameter]
    rng: np.random.Generator
    generator: torch.Generator
    counter: PassCounter
    step: int = 0
    forget_prompts: list[str] = field(default_factory=list)
    anchor_prompts: list[str] = field(default_factory=list)
    forget_latents: torch.Tensor | None = None
    retain_prompt_list: list[str] = field(default_factory=list)
    retain_latents: torch.Tensor | None = None

    def encode(self, prompts: list[str]) -> TextEncoding:
        return self.model.encode(prompts)

    def noisy(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, noise) for clean latents at random timesteps."""
        noise = torch.randn(clean.shape, generator=self.generator).to(clean)
        t = self.model.sample_timesteps(len(clean), self.generator)
        return self.model.scheduler.add_noise(clean, noise, t), t, noise

    def retain_prompts(self, n: int) -> list[str]:
        """Prompts of retained concepts; the unconditional prompt when a store names none."""
        forgotten = self.context.forgotten + tuple(self.request.targets)
        return self.context.prompts.retain_prompts(forgotten, n, self.rng) or [""] * n


class GradientMethod(UnlearningMethod):
    """Base of every gradient method: implement ``loss``; optionally ``setup``."""

    uses_teacher: bool = True
    accepts_regularizers = True
    gradient_mask: dict[str, torch.Tensor] | None = None  # set in setup() by masked methods

    def setup(self, session: TrainingSession) -> None:
        """Called once before training (e.g. to compute masks or pick random targets)."""

    @abstractmethod
    def loss(self, session: TrainingSession) -> torch.Tensor:
        """The method's loss for one step."""

    def stages(self, session: TrainingSession) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
        """The optimizer steps of one iteration, as (loss, gradient mask or None). Most methods
        take one; alternating methods (SFR-on) yield a forget and a retain stage, and each loss
        is computed only after the previous stage's step."""
        yield self.loss(session), self.gradient_mask

    def unlearn(self, model, request, context: UnlearningContext) -> MethodResult:
        from ..regularizers import get_regularizer

        config = self.config
        torch.manual_seed(request.seed)
        accelerator = Accelerator(cpu=context.device.type == "cpu")
        model.to(accelerator.device)
        model.unet.requires_grad_(False)
        params = select_parameters(model.unet, config.trainable_regex)
        for p in params.values():
            p.requires_grad_(True)
        before = {n: p.detach().clone() for n, p in params.items()}
        teacher = None
        if self.uses_teacher:
            teacher = copy.copy(model)
            teacher.unet = copy.deepcopy(model.unet).requires_grad_(False).eval()
        counter = PassCounter(*(m for m in (model.unet, teacher.unet if teacher else None) if m is not None))
        session = TrainingSession(model, self, teacher, request, context, config, params,
                                  np.random.default_rng(request.seed), torch.Generator().manual_seed(request.seed), counter)
        pairs = context.prompts.forget_pairs(tuple(request.targets), request.anchor, max(64, config.forget_images), session.rng)
        session.forget_prompts = [p.target for p in pairs]
        session.anchor_prompts = [p.anchor for p in pairs]
        session.forget_latents = self._draw_forget_latents(session)

        regularizers = [get_regularizer(spec.name).from_options(spec.config) for spec in request.regularizers]
        for reg in regularizers:
            reg.setup(session)
        self.setup(session)

        optimizer = torch.optim.Adam(list(params.values()), lr=config.learning_rate)
        model.unet, optimizer = accelerator.prepare(model.unet, optimizer)
        model.unet.train()
        losses = []
        for step in range(config.steps):
            session.step = step
            for loss, mask in self.stages(session):
                for reg in regularizers:
                    extra = reg.penalty(session)
                    if extra is not None:
                        loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                counter.backward += 1
                if mask is not None:
                    for name, p in params.items():
                        if p.grad is not None:
                            p.grad.mul_(mask[name])
                for reg in regularizers:
                    reg.transform_gradients(session)
                optimizer.step()
                for reg in regularizers:
                    reg.after_step(session)
                losses.append(float(loss.detach()))
            if context.progress:
                context.progress(1, loss=round(losses[-1], 5))
        model.unet = accelerator.unwrap_model(model.unet).eval()
        counter.close()
        model.unet.requires_grad_(False)

        deltas = {n: (p.detach() - before[n]).cpu() for n, p in params.items()}
        for reg in regularizers:
            deltas = reg.finalize(session, deltas)
        # restore the model: the store applies the edit itself, so replay stays the only truth
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
        deltas = {f"unet.{n}": d for n, d in deltas.items() if torch.count_nonzero(d)}
        regularizer_states = {reg.name: reg.state() for reg in regularizers if reg.state()}
        stats = {"unet_forward_passes": counter.forward, "unet_backward_passes": counter.backward,
                 "steps": config.steps, "final_loss": losses[-1] if losses else None,
                 "first_loss": losses[0] if losses else None,
                 "trained_parameters": sum(p.numel() for p in params.values())}
        return MethodResult(Edit(deltas=deltas), {}, stats, regularizer_states)

    def image_prompts(self, session: TrainingSession) -> list[str]:
        """Prompts whose images serve as x_0: the targets' by default (data-free, as in ESD)."""
        return session.forget_prompts

    @torch.no_grad()
    def _draw_forget_latents(self, session: TrainingSession) -> torch.Tensor:
        """x_0 images drawn by the frozen model for ``image_prompts``, index-aligned with the
        forget prompts."""
        source = session.teacher or session.model
        prompts = self.image_prompts(session)[:session.config.forget_images]
        images = source.sample(prompts, steps=session.config.sampling_steps, seed=int(session.rng.integers(2**31)))
        return source.to_latents(images)

    @torch.no_grad()
    def retain_batch(self, session: TrainingSession):
        """(prompts, clean, x_t, t, noise) for retained concepts; the frozen model draws their
        images once per request (data-free, like the forget images)."""
        if session.retain_latents is None:
            source = session.teacher or session.model
            session.retain_prompt_list = session.retain_prompts(session.config.forget_images)
            images = source.sample(session.retain_prompt_list, steps=session.config.sampling_steps,
                                   seed=int(session.rng.integers(2**31)))
            session.retain_latents = source.to_latents(images)
        index = session.rng.integers(0, len(session.retain_latents), session.config.batch_size)
        clean = session.retain_latents[index]
        noisy, t, noise = session.noisy(clean)
        return [session.retain_prompt_list[i] for i in index], clean, noisy, t, noise

    def denoising_loss(self, session: TrainingSession, prompts, clean, noisy, t, noise) -> torch.Tensor:
        model = session.model
        return (model.predict(noisy, t, session.encode(prompts)) - model.training_target(clean, noise, t)).pow(2).mean()

    def forget_denoising_batch(self, session: TrainingSession):
        """``forget_batch`` without the anchor prompts, shaped like ``retain_batch``."""
        prompts, _, clean, noisy, t, noise = self.forget_batch(session)
        return prompts, clean, noisy, t, noise

    def forget_batch(self, session: TrainingSession):
        """A batch of (forget prompts, anchor prompts, x_t, t) from the cached forget images."""
        index = session.rng.integers(0, len(session.forget_latents), session.config.batch_size)
        clean = session.forget_latents[index]
        noisy, t, noise = session.noisy(clean)
        return ([session.forget_prompts[i] for i in index], [session.anchor_prompts[i] for i in index],
                clean, noisy, t, noise)
