"""Merging per-request deltas (CUIG's model-merging regularizers).

Each request's trained delta is a task vector. As in CUIG, a request trains from the pretrained
weights by default (``mode=independent``), so its task vector does not depend on earlier
requests; ``mode=sequential`` trains it on the current, already merged model instead. After
training, the request's final weights are ``current + merged - previous_merged``, where
``merged`` combines the task vectors of every request so far: ``uniform`` (their mean),
``task_arithmetic`` (scale x their sum) or ``ties`` (trim each to its top-k magnitudes, elect a
sign per weight by the summed mass, average the entries that agree, times scale). Task vectors live in the store's state, so rollback restores
them with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Regularizer, register_regularizer

STRATEGIES = ("uniform", "task_arithmetic", "ties")
MODES = ("independent", "sequential")


@dataclass
class MergeConfig:
    strategy: str = field(default="ties", metadata={"help": f"one of {', '.join(STRATEGIES)}"})
    scale: float = field(default=1.0, metadata={"help": "lambda for task arithmetic and TIES"})
    top_k: float = field(default=0.2, metadata={"help": "share of each task vector TIES keeps"})
    mode: str = field(default="independent", metadata={
        "help": "independent: each request trains from the pretrained weights (CUIG); sequential: from the current model"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown merge strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if self.mode not in MODES:
            raise ValueError(f"Unknown merge mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.scale <= 0 or not 0 < self.top_k <= 1:
            raise ValueError("scale must be positive and top_k in (0, 1]")


def ties_merge(vectors: torch.Tensor, top_k: float) -> torch.Tensor:
    """TIES on stacked task vectors (tasks x weights)."""
    keep = max(1, int(round(top_k * vectors.shape[1])))
    thresholds = vectors.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(vectors.abs() >= thresholds, vectors, torch.zeros_like(vectors))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    return torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0) / count


def merge_vectors(vectors: torch.Tensor, config: MergeConfig) -> torch.Tensor:
    if config.strategy == "uniform":
        return vectors.mean(0)
    if config.strategy == "task_arithmetic":
        return config.scale * vectors.sum(0)
    return config.scale * ties_merge(vectors, config.top_k)


@register_regularizer
class Merge(Regularizer):
    name = "merge"
    description = "merge per-request task vectors (trained from the pretrained weights by default, as CUIG): uniform, task arithmetic or TIES"
    config_class = MergeConfig
    rewrites_edit = True

    def start_weights(self, context) -> dict[str, torch.Tensor] | None:
        return context.base_weights if self.config.mode == "independent" else None

    def setup(self, session) -> None:
        saved = session.context.regularizer_states.get(self.name, {})
        self.previous = {k[len("tasks."):]: v for k, v in saved.items() if k.startswith("tasks.")}
        self.names = list(session.params)

    def _flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].flatten() for n in self.names])

    def _unflatten(self, flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n in self.names:
            out[n] = flat[offset:offset + like[n].numel()].view_as(like[n])
            offset += like[n].numel()
        return out

    def finalize(self, session, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = len({k.split(".")[0] for k in self.previous})
        earlier = [self._flatten({n: self.previous.get(f"{i}.{n}", torch.zeros_like(deltas[n])) for n in self.names})
                   for i in range(count)]
        current = self._flatten(deltas)
        before = merge_vectors(torch.stack(earlier), self.config) if earlier else torch.zeros_like(current)
        after = merge_vectors(torch.stack(earlier + [current]), self.config)
        self.tasks = {**self.previous, **{f"{count}.{n}": d.clone() for n, d in deltas.items()}}
        return self._unflatten(after - before, deltas)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"tasks.{k}": v for k, v in self.tasks.items()}
