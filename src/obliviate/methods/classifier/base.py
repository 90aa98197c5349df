"""The shared loop of classifier unlearning methods.

A classifier method sees a ``ClassifierSession``: the network being edited, a frozen copy of it
(the teacher), this request's forget set, the data still retained (every earlier forgotten
target removed), seeded shuffling and an optimizer over the parameters it may train. It runs its
updates in ``run``; the loop turns the weight change into the request's ``Edit``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..base import Edit, MethodResult, UnlearningContext, UnlearningMethod
from ...training import PassCounter, accumulate_gradients, match_names


@dataclass
class ClassifierConfig:
    """Options every classifier method shares."""

    epochs: int = field(default=5, metadata={"help": "passes over the data the method trains on"})
    learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    trainable: str = field(default=".*", metadata={"help": "regex over network parameter names that may change"})

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if self.learning_rate <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("learning_rate must be positive and momentum in [0, 1)")
        try:
            re.compile(self.trainable)
        except re.error as error:
            raise ValueError(f"trainable={self.trainable!r} is not a valid regex: {error}") from None


@dataclass
class ClassifierSession:
    net: nn.Module
    teacher: nn.Module  # frozen copy from the start of the request
    config: ClassifierConfig
    request: object
    context: UnlearningContext
    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    known_classes: torch.Tensor  # classes not forgotten (random labels are drawn from these)
    params: dict[str, nn.Parameter]
    generator: torch.Generator
    counter: PassCounter
    optimizer: torch.optim.Optimizer | None = None
    mask: dict[str, torch.Tensor] | None = None  # parameters' update masks (saliency methods)

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass over (x, y)."""
        size = batch_size or self.config.batch_size
        order = torch.randperm(len(x), generator=self.generator).to(x.device)
        for i in range(0, len(x), size):
            index = order[i:i + size]
            yield x[index], y[index]

    def random_batch(self, x: torch.Tensor, y: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x), (size or self.config.batch_size,), generator=self.generator).to(x.device)
        return x[index], y[index]

    def random_labels(self, y: torch.Tensor) -> torch.Tensor:
        """A known class other than the true one for every example."""
        choices = self.known_classes.to(y.device)
        labels = choices[torch.randint(0, len(choices), y.shape, generator=self.generator).to(y.device)]
        clash = labels == y
        if clash.any() and len(choices) > 1:
            labels[clash] = self.random_labels(y[clash])
        return labels

    def step(self, loss: torch.Tensor, clip_norm: float | None = None) -> None:
        """Backward, mask the gradients when a mask is set, clip their norm to ``clip_norm`` when
        given, and take an optimizer step."""
        self.optimizer.zero_grad()
        loss.backward()
        self.counter.backward += 1
        if self.mask is not None:
            for name, p in self.params.items():
                if p.grad is not None:
                    p.grad.mul_(self.mask[name])
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params.values(), clip_norm)
        self.optimizer.step()

    def sgd(self, learning_rate: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.params.values(), lr=learning_rate or self.config.learning_rate,
                               momentum=self.config.momentum)

    def gradients(self, loss_fn, x: torch.Tensor, y: torch.Tensor, squared: bool = False) -> dict[str, torch.Tensor]:
        """Sum over batches of the gradient of ``loss_fn(logits, y)`` (of its square per batch
        with ``squared``, a diagonal Fisher estimate), without changing the weights."""
        batches = iter(list(self.batches(x, y)))

        def loss() -> torch.Tensor:
            bx, by = next(batches)
            return loss_fn(self.net(bx), by)
        return accumulate_gradients(self.params, loss, -(-len(x) // self.config.batch_size), squared,
                                    on_backward=self.counter.count_backward)


class ClassifierMethod(UnlearningMethod):
    """Subclasses set ``name``, ``description``, ``config_class`` and implement ``run``."""

    family = "classifier"

    def run(self, session: ClassifierSession) -> dict[str, torch.Tensor]:
        """Update ``session.net`` in place; return the method's state for the next request."""
        raise NotImplementedError

    def check_parameters(self, names) -> None:
        match_names(names, self.config.trainable, "network")

    def unlearn(self, model, request, context: UnlearningContext) -> MethodResult:
        targets = context.prompts
        device = model.device
        request_split = targets.split(tuple(request.targets))
        retained = targets.split(context.forgotten + tuple(request.targets))
        if len(request_split.forget_x) == 0:
            raise ValueError(f"Request {request.label!r} names no training data.")
        forgotten_classes = targets.classes(context.forgotten + tuple(request.targets))
        known = torch.tensor([c for c in range(targets.dataset.num_classes) if c not in forgotten_classes])
        if len(known) == 0:
            raise ValueError(f"Request {request.label!r} would forget the last classes the model knows; a classifier "
                             "must keep at least one. Roll back or drop the request.")
        before = model.state_tensors()
        named = dict(model.net.named_parameters())
        params = {n: named[n] for n in match_names(list(named), self.config.trainable, "network")}
        for name, p in model.net.named_parameters():
            p.requires_grad_(name in params)
        session = ClassifierSession(
            net=model.net.train(), teacher=copy.deepcopy(model.net).eval().requires_grad_(False), config=self.config,
            request=request, context=context,
            forget_x=request_split.forget_x.to(device), forget_y=request_split.forget_y.to(device),
            retain_x=retained.retain_x.to(device), retain_y=retained.retain_y.to(device), known_classes=known,
            params=params, generator=torch.Generator().manual_seed(request.seed), counter=PassCounter(model.net))
        session.optimizer = session.sgd()
        try:
            state = self.run(session) or {}
        finally:
            session.counter.close()
            model.net.eval().requires_grad_(True)
        edit = Edit.between(before, model.state_tensors())
        if not edit.deltas:
            raise RuntimeError(f"{self.name} left every weight unchanged; raise epochs or learning_rate.")
        model.load_state_tensors(before)
        return MethodResult(edit, state, stats={"forward_passes": session.counter.forward,
                                                "backward_passes": session.counter.backward})
