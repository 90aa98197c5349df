"""UNDO for classifiers: another classifier method's forgetting, distilled into a noised copy.

Forgetting that moves only the head leaves the features that told the class apart, so a few SGD
steps on the forget set bring it back. As in the diffusion ``undo`` (Lee et al., "Distillation
robustifies unlearning"), the inner method's result is the teacher; every weight is mixed with
a fresh initialisation,

    theta_student = (1 - noise) theta_teacher + noise theta_init,

and the student is trained to match the teacher's predictions on the retained data and the
forget set (where the teacher no longer predicts the class),

    L = T^2 KL( softmax(f_teacher(x) / T) || softmax(f_student(x) / T) ),   x in D_r + D_f.

Features the teacher no longer needs for any prediction are not rebuilt. Parameters that no
layer's ``reset_parameters`` initialises (a ViT's position table) keep the teacher's value. The
inner method's state (FG-OrIU's subspaces) is passed on as it left the teacher.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ...seeding import seeded
from ...training import match_names
from ..base import register_method
from ..undo import build_teacher_method, check_teacher_options
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class ClassifierUndoConfig(ClassifierConfig):
    method: str = field(default="fgoriu", metadata={
        "help": "the classifier method that forgets first (the teacher): NAME or NAME;key=value;..."})
    noise: float = field(default=0.9, metadata={"help": "share of every weight replaced by a fresh initialisation",
                                                "range": (0.0, 1.0)})
    epochs: int = field(default=30, metadata={"help": "distillation passes over the retained data and forget set"})
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate of the distillation (one cycle)"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the distillation"})

    def __post_init__(self):
        super().__post_init__()
        check_teacher_options(self.method, self.noise, example="fgoriu")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def reinitialised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``module`` with every layer's ``reset_parameters`` run under ``seed``, leaving the
    caller's random state alone."""
    fresh = copy.deepcopy(module)
    with seeded(seed):
        for layer in fresh.modules():
            if layer is not fresh and hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return fresh


@register_method
class ClassifierUndo(ClassifierMethod):
    name = "undo"
    description = "UNDO: another method's forgetting, distilled into a noised copy so that relearning is slow"
    config_class = ClassifierUndoConfig

    def __init__(self, config: ClassifierUndoConfig | None = None):
        super().__init__(config)
        self.teacher_method = build_teacher_method(self.config.method, family="classifier")

    def check_parameters(self, names) -> None:
        super().check_parameters(names)
        self.teacher_method.check_parameters(names)

    def run(self, session):
        state = self._run_teacher(session)
        config, net = self.config, session.net
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
        fresh = reinitialised(net, session.request.seed)
        with torch.no_grad():
            for name, weight in session.params.items():
                weight.mul_(1 - config.noise).add_(fresh.get_parameter(name), alpha=config.noise)
        del fresh

        x = torch.cat([session.retain_x, session.forget_x])
        session.optimizer = torch.optim.Adam(session.params.values(), lr=config.learning_rate)
        steps = config.epochs * -(-len(x) // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(session.optimizer, config.learning_rate, total_steps=steps)
        temperature = config.temperature
        net.train()
        for _ in range(config.epochs):
            for inputs, _ in session.batches(x, x):
                with torch.no_grad():  # the teacher on the same batch: with noise=0 the loss starts at exactly 0
                    log_teacher = F.log_softmax(teacher(inputs) / temperature, dim=1)
                log_student = F.log_softmax(net(inputs) / temperature, dim=1)
                session.counter.forward += 1
                loss = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2
                session.step(loss)
                schedule.step()
        return state

    def _run_teacher(self, session) -> dict[str, torch.Tensor]:
        """The inner method on this session's network, with its own options and parameters."""
        method = self.teacher_method
        named = dict(session.net.named_parameters())
        # the outer ``trainable`` bounds what may change at all, the inner method's included
        chosen = match_names(list(session.params), method.config.trainable, "network (within undo's trainable)")
        params = {n: named[n] for n in chosen}
        inner = dataclasses.replace(session, config=method.config, params=params, mask=None)
        inner.optimizer = inner.sgd()
        for name, p in named.items():
            p.requires_grad_(name in params)
        try:
            return method.run(inner) or {}
        finally:
            for name, p in named.items():
                p.requires_grad_(name in session.params)
