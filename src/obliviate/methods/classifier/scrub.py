"""SCRUB (Kurmanji et al., NeurIPS 2023): the unlearned model is a student of the original one.
Max-steps push the student away from the teacher on the forget set; min-steps keep it close to
the teacher, and correct, on the retained data:

    max-step:  maximise KL(p_teacher || p_student) on D_f
    min-step:  minimise alpha * KL(p_teacher || p_student) + gamma * CE(student) on D_r

with temperature-softened distributions, and max-steps only in the first ``max_epochs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..base import register_method
from .base import ClassifierConfig, ClassifierMethod


@dataclass
class ScrubConfig(ClassifierConfig):
    epochs: int = field(default=3, metadata={"help": "total epochs (min-steps every epoch)"})
    max_epochs: int = field(default=2, metadata={"help": "epochs that also run max-steps on the forget set"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the retain KL term"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the retain cross-entropy"})
    temperature: float = field(default=4.0, metadata={"help": "distillation temperature"})
    learning_rate: float = field(default=5e-3, metadata={"help": "SGD learning rate"})


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at ``temperature``, scaled by T^2 as in knowledge distillation."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2


@register_method
class Scrub(ClassifierMethod):
    name = "scrub"
    description = "SCRUB: student moves away from the teacher on the forget set, stays close elsewhere"
    config_class = ScrubConfig

    def run(self, session):
        cfg = self.config
        for epoch in range(cfg.epochs):
            if epoch < cfg.max_epochs:
                for x, _ in session.batches(session.forget_x, session.forget_y):
                    with torch.no_grad():
                        teacher = session.teacher(x)
                    session.step(-distill_kl(session.net(x), teacher, cfg.temperature))
            for x, y in session.batches(session.retain_x, session.retain_y):
                with torch.no_grad():
                    teacher = session.teacher(x)
                logits = session.net(x)
                session.step(cfg.alpha * distill_kl(logits, teacher, cfg.temperature) + cfg.gamma * F.cross_entropy(logits, y))
