"""Merging per-request deltas (CUIG's model-merging regularizers).

Each request's trained delta is a task vector. As in CUIG, a request trains from the pretrained
weights by default (``mode=independent``), so its task vector does not depend on earlier
requests; ``mode=sequential`` trains it on the current, already merged model instead. After
training, the request's final weights are ``current + merged - previous_merged``, where
``merged`` combines the task vectors of every request so far: ``uniform`` (their mean),
``task_arithmetic`` (scale x their sum) or ``ties`` (trim each to its top-k magnitudes, elect a
sign per weight by the summed mass, average the entries that agree, times scale) or ``iteris``
(IterIS's closed form, layer by layer, on each task's layer inputs; see ``iteris_merge``). Task
vectors, and for ``iteris`` each task's inputs, live in the store's state, so rollback restores
them with the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..training import token_states
from .base import Regularizer, register_regularizer

STRATEGIES = ("uniform", "task_arithmetic", "ties", "iteris")
TEXT_INPUT_LAYERS = re.compile(r"attn2\.(to_k|to_v)\.weight$")  # their input is the prompt's token states
MODES = ("independent", "sequential")


@dataclass
class MergeConfig:
    strategy: str = field(default="ties", metadata={"help": f"one of {', '.join(STRATEGIES)}"})
    scale: float = field(default=1.0, metadata={"help": "lambda for task arithmetic and TIES"})
    top_k: float = field(default=0.2, metadata={"help": "share of each task vector TIES keeps"})
    mode: str = field(default="independent", metadata={
        "help": "independent: each request trains from the pretrained weights (CUIG); sequential: from the current model"})
    alpha: float = field(default=1e-5, metadata={"help": "iteris: ridge on each task's input Gram, relative to its norm"})
    samples: int = field(default=32, metadata={"help": "iteris: forget prompts whose token states are a task's inputs"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown merge strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        if self.mode not in MODES:
            raise ValueError(f"Unknown merge mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.scale <= 0 or not 0 < self.top_k <= 1:
            raise ValueError("scale must be positive and top_k in (0, 1]")
        if self.alpha < 0 or self.samples <= 0:
            raise ValueError("alpha must be >= 0 and samples positive")


def ties_merge(vectors: torch.Tensor, top_k: float) -> torch.Tensor:
    """TIES on stacked task vectors (tasks x weights)."""
    keep = max(1, int(round(top_k * vectors.shape[1])))
    thresholds = vectors.abs().topk(keep, dim=1).values[:, -1:]
    trimmed = torch.where(vectors.abs() >= thresholds, vectors, torch.zeros_like(vectors))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    return torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0) / count


def iteris_merge(weights: list[torch.Tensor], inputs: list[torch.Tensor], alpha: float = 1e-5, rounds: int = 1,
                 refresh: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """IterIS for one linear layer: tasks i with weights W_i (out x in) and inputs X_i (n_i x in)
    recorded on task i's own model; X~_i are the merged model's inputs (X at round 0):

        W* = [sum_i c_i W_i (X_i^T X~_i + a |X_i^T X~_i|_F I)] [sum_i c_i (X~_i^T X~_i + a |X~_i^T X~_i|_F I)]^-1,
        c_i = |W_i|_F^2 / |W_i X_i^T|_F^2,

    solved, not inverted. After each round ``refresh(W*)`` re-records the X~_i on the merged
    model; a layer whose inputs no edit changes (cross-attention K/V: the token states) needs one
    round, which is RegMean with IterIS's normalisation."""
    merged_inputs = list(inputs)
    merged = weights[0]
    for round_ in range(rounds):
        left, right = 0, 0
        for w, x, x_merged in zip(weights, inputs, merged_inputs):
            w, x, x_merged = w.double(), x.double(), x_merged.double()
            c = float(w.pow(2).sum() / (w @ x.T).pow(2).sum().clamp_min(1e-30))
            cross, gram = x.T @ x_merged, x_merged.T @ x_merged
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            left = left + c * w @ (cross + alpha * cross.norm() * eye)
            right = right + c * (gram + alpha * gram.norm() * eye)
        merged = torch.linalg.solve(right.T, left.T).T.to(weights[0].dtype)  # W* right = left
        if refresh is None or round_ == rounds - 1:
            break
        merged_inputs = refresh(merged)
    return merged


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
        other = [n for n in self.names if not TEXT_INPUT_LAYERS.search(n)]
        if self.config.strategy == "iteris" and other:  # refused before any training is spent
            raise ValueError(f"merge:strategy=iteris merges layers whose input is the prompt (attn2.to_k/to_v); "
                             f"{other[0]!r} is not one. Train trainable=xattn-kv, or use another strategy.")

    def _flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].flatten() for n in self.names])

    def _unflatten(self, flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n in self.names:
            out[n] = flat[offset:offset + like[n].numel()].view_as(like[n])
            offset += like[n].numel()
        return out

    def finalize(self, session, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.strategy == "iteris":
            return self._iteris(session, deltas)
        count = len({k.split(".")[0] for k in self.previous})
        earlier = [self._flatten({n: self.previous.get(f"{i}.{n}", torch.zeros_like(deltas[n])) for n in self.names})
                   for i in range(count)]
        current = self._flatten(deltas)
        before = merge_vectors(torch.stack(earlier), self.config) if earlier else torch.zeros_like(current)
        after = merge_vectors(torch.stack(earlier + [current]), self.config)
        self.tasks = {**self.previous, **{f"{count}.{n}": d.clone() for n, d in deltas.items()}}
        return self._unflatten(after - before, deltas)

    def _iteris(self, session, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's IterIS merge of every task so far, minus the merge of the earlier ones.
        A task's inputs are the token states of its forget prompts, which no UNet edit changes,
        so only cross-attention K/V layers can be merged this way."""
        count = len({k.split(".")[0] for k in self.previous if not k.startswith("inputs")})
        with torch.no_grad():
            current = token_states(session.model, session.forget_prompts[:self.config.samples]).float()
        inputs = [self.previous[f"inputs.{i}"] for i in range(count)] + [current]
        base = session.context.base_weights
        merged = {}
        for n, delta in deltas.items():
            start = base[f"unet.{n}"].to(delta)
            vectors = [self.previous.get(f"{i}.{n}", torch.zeros_like(delta)) for i in range(count)] + [delta]
            before = (iteris_merge([start + v for v in vectors[:-1]], inputs[:-1], self.config.alpha) - start
                      if count else torch.zeros_like(delta))
            after = iteris_merge([start + v for v in vectors], inputs, self.config.alpha) - start
            merged[n] = after - before
        self.tasks = {**self.previous, **{f"{count}.{n}": d.clone() for n, d in deltas.items()}, f"inputs.{count}": current}
        return merged

    def state(self) -> dict[str, torch.Tensor]:
        return {f"tasks.{k}": v for k, v in self.tasks.items()}
