"""UNDO (unlearn, noise, distill on outputs): make another method's erasure deep.

An erasure that only reroutes the prompt leaves the model able to draw the concept, so a few
fine-tuning steps bring it back. UNDO (Lee et al., "Distillation robustifies unlearning") runs
a method (the teacher: the model with that method's edit), then damages every UNet weight by
mixing it with a fresh initialisation,

    theta_student = (1 - noise) theta_teacher + noise theta_init,

and trains the student to reproduce the teacher's outputs on images the teacher draws,

    L = || f_student(x_t, c, t) - sg[f_teacher(x_t, c, t)] ||^2,   x_0 ~ teacher(c),

with c from retained prompts, the targets' prompts (which the teacher no longer draws) and the
empty prompt. The student relearns only what the teacher still shows; the capacity the noise
destroyed and the teacher no longer exercises does not come back with it. ``noise`` trades
depth for the distillation it takes to recover quality. The edit is dense over every UNet weight
(plus the inner method's added tensors, such as a text transform).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import build_config, config_to_dict, parse_assignments
from ..seeding import seeded
from ..training import PassCounter
from .base import Edit, MethodResult, UnlearningContext, UnlearningMethod, get_method, register_method

UNET_TENSORS = re.compile(r"^unet\.")  # the distilled weights; added tensors (a text transform) stay the inner edit's


def split_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"ablation;trainable=xattn-kv;steps=40"`` -> ``("ablation", {...})``: a method inside an
    option value, its options separated by ``;`` (the outer spec already uses commas)."""
    name, *options = [part.strip() for part in spec.split(";") if part.strip()] or [""]
    try:
        return name, parse_assignments(options)
    except ValueError:
        raise ValueError(f"method={spec!r}: expected NAME;key=value;... with each option a key=value.") from None


def check_teacher_options(method: str, noise: float, example: str) -> None:
    """The checks every UNDO config shares: a noise that keeps something of the teacher, and a
    teacher that is not itself a distillation."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1): 1 would keep nothing of the teacher, got {noise}")
    if split_method_spec(method)[0] == "undo":
        raise ValueError(f"method=undo would distil a distillation; name the method that forgets, e.g. method={example}.")


def build_teacher_method(spec: str, family: str = "t2i") -> UnlearningMethod:
    """The method ``NAME;key=value;...`` names, in the model family's registry, with those options."""
    name, options = split_method_spec(spec)
    method_cls = get_method(name, family)
    return method_cls(build_config(method_cls.config_class, options, owner=f"undo's method {name!r}"))


@dataclass
class UndoConfig:
    method: str = field(default="uce", metadata={
        "help": "the method that erases first (the teacher): NAME or NAME;key=value;... with that method's options"})
    noise: float = field(default=0.8, metadata={"help": "share of every UNet weight replaced by a fresh initialisation",
                                                "range": (0.0, 1.0)})
    steps: int = field(default=2000, metadata={"help": "distillation steps"})
    batch_size: int = field(default=32, metadata={"help": "noised images per step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate of the distillation"})
    images: int = field(default=512, metadata={"help": "images the teacher draws to distill on"})
    sampling_steps: int = field(default=10, metadata={"help": "DDIM steps the teacher draws them with"})
    forget_share: float = field(default=0.2, metadata={
        "help": "share of those images drawn for the targets' prompts (the rest for retained prompts)", "range": (0.0, 1.0)})
    prompt_dropout: float = field(default=0.1, metadata={
        "help": "share of distillation rows conditioned on the empty prompt (keeps guidance working)", "range": (0.0, 1.0)})

    def __post_init__(self):
        for name in ("steps", "batch_size", "images", "sampling_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_teacher_options(self.method, self.noise, example="uce")


@register_method
class Undo(UnlearningMethod):
    name = "undo"
    description = "UNDO: another method's erasure, distilled into a noised copy so that fine-tuning cannot undo it"
    config_class = UndoConfig
    accepts_regularizers = True  # handed to the teacher method, which must run them

    def __init__(self, config: UndoConfig | None = None):
        super().__init__(config)
        self.teacher_method = build_teacher_method(self.config.method)

    def check_parameters(self, names) -> None:
        self.teacher_method.check_parameters(names)

    def unlearn(self, model, request, context: UnlearningContext) -> MethodResult:
        config, teacher_method = self.config, self.teacher_method
        if request.regularizers and not teacher_method.accepts_regularizers:
            raise ValueError(f"undo's method {teacher_method.name!r} does not run regularizers; drop --regularizer "
                             "or name a gradient method (method=ablation;trainable=xattn-kv).")
        inner_request = dataclasses.replace(request, method=teacher_method.name,
                                            method_config=config_to_dict(teacher_method.config))
        inner = teacher_method.unlearn(model, inner_request, context)
        teacher, student = copy.copy(model), copy.copy(model)  # the frozen text encoder is shared, not copied
        teacher.unet = copy.deepcopy(model.unet)
        teacher.load_state_tensors(inner.edit.apply(model.state_tensors()))
        teacher.unet.requires_grad_(False).eval()
        student.unet = copy.deepcopy(teacher.unet)
        student.text_transforms = teacher.text_transforms
        with seeded(request.seed):
            fresh = type(student.unet).from_config(student.unet.config).to(student.device)
        with torch.no_grad():
            for weight, init in zip(student.unet.parameters(), fresh.parameters()):
                weight.mul_(1 - config.noise).add_(init, alpha=config.noise)
        del fresh

        counter = PassCounter(teacher.unet, student.unet)
        try:
            losses = self._distill(teacher, student, request, context, counter)
        finally:
            counter.close()
        unet = Edit.between(model.state_tensors(UNET_TENSORS), student.state_tensors(UNET_TENSORS)).deltas
        stats = {**{f"teacher_{k}": v for k, v in inner.stats.items()},
                 "unet_forward_passes": counter.forward + inner.stats.get("unet_forward_passes", 0),
                 "unet_backward_passes": counter.backward + inner.stats.get("unet_backward_passes", 0),
                 "distill_first_loss": losses[0], "distill_final_loss": losses[-1]}
        return MethodResult(Edit(deltas=unet, additions=inner.edit.additions),
                            inner.state, stats, inner.regularizer_states)

    def _distill(self, teacher, student, request, context: UnlearningContext, counter: PassCounter) -> list[float]:
        config = self.config
        rng = np.random.default_rng(request.seed)
        generator = torch.Generator().manual_seed(request.seed)
        n_forget = round(config.images * config.forget_share)
        forgotten = context.forgotten + tuple(request.targets)
        prompts = [p.target for p in context.prompts.forget_pairs(tuple(request.targets), request.anchor, n_forget, rng)]
        prompts = prompts[:n_forget] + (context.prompts.retain_prompts(forgotten, config.images - n_forget, rng)
                                        or [""] * (config.images - n_forget))
        with torch.no_grad():
            clean = teacher.to_latents(teacher.sample(prompts, steps=config.sampling_steps, seed=int(rng.integers(2**31))),
                                       generator=generator)
        optimizer = torch.optim.Adam(student.unet.parameters(), lr=config.learning_rate)
        student.unet.requires_grad_(True).train()
        losses = []
        try:
            for _ in range(config.steps):
                index = torch.from_numpy(rng.integers(0, len(clean), config.batch_size))
                x0 = clean[index]
                noise = torch.randn(x0.shape, generator=generator).to(x0)
                t = teacher.sample_timesteps(len(index), generator)
                noisy = teacher.scheduler.add_noise(x0, noise, t)
                dropped = rng.random(len(index)) < config.prompt_dropout
                encoding = teacher.encode(["" if drop else prompts[i] for i, drop in zip(index.tolist(), dropped)])
                with torch.no_grad():
                    target = teacher.predict(noisy, t, encoding)
                loss = (student.predict(noisy, t, encoding) - target).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                counter.count_backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if context.progress:
                    context.progress(1, loss=round(losses[-1], 5))
        finally:
            student.unet.requires_grad_(False).eval()
        return losses
