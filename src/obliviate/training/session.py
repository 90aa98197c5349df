"""What one request's training run sees: the typed ``TrainingSession`` with its batches and
losses, the options every gradient method shares, and the parameter selection."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch

from ..models.t2i import T2IModel
from ..models.text import TextEncoding
from ..request import Request, UnlearningContext
from ..world.targets import PromptSource
from .gradients import accumulate_gradients

# Named parameter groups of a diffusers UNet, as used by ESD's variants.
TRAINABLE_PRESETS = {
    "xattn": r"attn2\.",                      # every cross-attention parameter (esd-x)
    "xattn-kv": r"attn2\.(to_k|to_v)\.",      # cross-attention keys and values (esd-x-strict, UCE's layers)
    "xattn-kvo": r"attn2\.(to_k|to_v|to_out\.0)\.weight",  # ... and the output projection's weight, not its bias (outproj)
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
    forget_images: int = field(default=16, metadata={
        "help": "images of the targets drawn by the frozen model, reused as x_0; a step's forget prompts are theirs, "
                "so this is also how many distinct forget prompts train"})
    sampling_steps: int = field(default=10, metadata={"help": "DDIM steps used to draw those images"})
    antithetic_timesteps: bool = field(default=False, metadata={
        "help": "draw half of each batch's timesteps and pair every t with T-1-t (lower-variance loss estimates)"})
    lora_rank: int = field(default=0, metadata={
        "help": "store each trained weight's update as a rank-r adapter (up @ down, down frozen to the top r directions "
                "of the request's first gradients; training.adapter); 0: a dense update"})
    avoid_forgotten: bool = field(default=False, metadata={
        "help": "forget prompts leave out concepts earlier requests forgot (the teacher predicts those erased, and a "
                "target built from its predictions can draw them again); the rows then cover fewer retained concepts"})
    partial_prompts: float = field(default=0.0, metadata={
        "help": "chance that each attribute besides the target's is left out of a forget prompt and its anchor "
                "('a striped triangle' / 'a triangle'): a later request that erases that attribute's word takes such "
                "forms as its anchors, and an erasure trained on full prompts only can come back there"})
    swap_anchors: bool = field(default=False, metadata={
        "help": "anchor each forget prompt with a random retained concept of the target's domain in the target's "
                "place, not with the prompt that leaves the target out: a model can draw a concept exactly when its "
                "domain goes unnamed (shapes-t2i draws dotted for 39 of 64 prompts that name no texture), and a "
                "concept erased against its own absence stays drawn; rehearse:objective=method anchors earlier "
                "concepts so too. A request's --anchor still wins"})
    lora_fit: Literal["trained", "svd"] = field(default="trained", metadata={
        "help": "how a lora_rank adapter is found: 'trained' (down frozen, up trained) or 'svd' (the weights train "
                "densely under the same constraints, and the edit keeps the update's top-r singular directions)"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "forget_images", "sampling_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: a dense update), got {self.lora_rank}")
        if not 0 <= self.partial_prompts <= 1:
            raise ValueError(f"partial_prompts must lie in [0, 1], got {self.partial_prompts}")
        if self.lora_fit not in ("trained", "svd"):
            raise ValueError(f"lora_fit must be 'trained' or 'svd', got {self.lora_fit!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        try:
            re.compile(self.trainable_regex)
        except re.error as error:
            raise ValueError(f"trainable={self.trainable!r} is not a valid regex: {error}") from None

    @property
    def trainable_regex(self) -> str:
        return TRAINABLE_PRESETS.get(self.trainable, self.trainable)


def match_names(names: Sequence[str], pattern: str, network: str = "UNet") -> list[str]:
    """The parameter names ``pattern`` (a regex) finds; a clear error when it finds none."""
    regex = re.compile(pattern)
    chosen = [n for n in names if regex.search(n)]
    if not chosen:
        raise ValueError(f"No {network} parameter matches {pattern!r}; names look like {names[0]!r} "
                         f"(and {len(names) - 1} more). Fix the trainable pattern.")
    return chosen


def select_parameters(unet: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Parameter]:
    params = dict(unet.named_parameters())
    return {n: params[n] for n in match_names(list(params), pattern)}


class PassCounter:
    """Counts forward calls of the given modules (each batched call is one pass) through a
    forward hook; ``backward`` is counted by whoever calls ``backward()``."""

    def __init__(self, *modules: torch.nn.Module):
        self.forward = 0
        self.backward = 0
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.forward += 1

    def watch(self, module: torch.nn.Module) -> None:
        """Count ``module``'s forward calls too (a scratch copy used for simulations)."""
        self._handles.append(module.register_forward_hook(self._hook))

    def count_backward(self, n: int = 1) -> None:
        self.backward += n

    def close(self):
        for h in self._handles:
            h.remove()


@dataclass(frozen=True)
class Batch:
    """Prompts with clean latents and their noised version. ``anchors`` are the forget prompts'
    anchor prompts, index-aligned; empty for retained prompts."""

    prompts: list[str]
    clean: torch.Tensor
    noisy: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    anchors: list[str] = field(default_factory=list)

    def rows(self, part: slice) -> "Batch":
        return Batch(self.prompts[part], self.clean[part], self.noisy[part], self.t[part], self.noise[part], self.anchors[part])


@dataclass
class TrainingSession:
    """Everything one request's training run can see; passed to method losses and regularizers.

    ``objective`` is the running method's loss for one step (regularizers that score weights by
    it call it). ``rng`` and ``generator`` are seeded by the request: nothing here touches the
    global random state.

    ``shard`` (rank, processes) is set while several processes train data-parallel: every process
    draws the same batches from the same random streams and keeps its own contiguous share of the
    rows, so the gradients they average are those of the whole batch."""

    model: T2IModel
    teacher: T2IModel | None  # frozen copy of the model at the start of the request
    request: Request
    context: UnlearningContext
    config: GradientConfig
    params: dict[str, torch.nn.Parameter]
    rng: np.random.Generator
    generator: torch.Generator
    counter: PassCounter
    objective: Callable[["TrainingSession"], torch.Tensor]
    step: int = 0
    forget_prompts: list[str] = field(default_factory=list)
    anchor_prompts: list[str] = field(default_factory=list)
    forget_latents: torch.Tensor | None = None
    retain_prompt_list: list[str] = field(default_factory=list)
    retain_latents: torch.Tensor | None = None
    concept_latents: torch.Tensor | None = None
    shard: tuple[int, int] = (0, 1)
    prefix: torch.Tensor | None = None  # soft states ``encode`` places after every prompt's first token

    @property
    def prompts(self) -> PromptSource:
        return self.context.prompts

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.request.targets)

    @property
    def frozen(self) -> T2IModel:
        """The model as it was at the start of the request (the teacher when there is one)."""
        return self.teacher or self.model

    def encode(self, prompts: list[str]) -> TextEncoding:
        encoding = self.model.encode(prompts)
        return encoding if self.prefix is None else encoding.with_prefix(self.prefix)

    @contextmanager
    def prefixed(self, states: torch.Tensor) -> Iterator[None]:
        """Run losses with ``states`` (k, D) placed after the first token of every prompt they
        encode: a method's own loss on an adversary's soft prompt."""
        saved, self.prefix = self.prefix, states
        try:
            yield
        finally:
            self.prefix = saved

    @contextmanager
    def using(self, model: T2IModel) -> Iterator[None]:
        """Run losses on ``model`` (a scratch copy a defence fine-tuned) in place of the trained
        model, with the session's batches, teacher and random streams."""
        trained, self.model = self.model, model
        try:
            yield
        finally:
            self.model = trained

    @contextmanager
    def forgetting(self, prompts: list[str], anchors: list[str], latents: torch.Tensor) -> Iterator[None]:
        """Run losses on other forget prompts, anchors and x_0 latents (concepts earlier requests
        forgot) in place of the request's, with the session's model, teacher and random streams."""
        saved = self.forget_prompts, self.anchor_prompts, self.forget_latents
        self.forget_prompts, self.anchor_prompts, self.forget_latents = prompts, anchors, latents
        try:
            yield
        finally:
            self.forget_prompts, self.anchor_prompts, self.forget_latents = saved

    def noisy(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, noise) for clean latents at random timesteps."""
        noise = torch.randn(clean.shape, generator=self.generator).to(clean)
        t = self.timesteps(len(clean))
        return self.model.scheduler.add_noise(clean, noise, t), t, noise

    def timesteps(self, n: int) -> torch.Tensor:
        """``n`` random timesteps; antithetic pairs (t, T-1-t) when the config asks for them."""
        if not self.config.antithetic_timesteps:
            return self.model.sample_timesteps(n, self.generator)
        half = self.model.sample_timesteps(-(-n // 2), self.generator)
        return torch.cat([half, self.model.scheduler.config.num_train_timesteps - 1 - half])[:n]

    def retain_prompts(self, n: int) -> list[str]:
        """Prompts of retained concepts; the unconditional prompt when a store names none."""
        forgotten = self.context.forgotten + self.targets
        return self.prompts.retain_prompts(forgotten, n, self.rng) or [""] * n

    def _batch(self, latents: torch.Tensor, prompts: list[str], anchors: list[str] | None = None) -> Batch:
        """``batch_size`` random rows of ``latents`` with their prompts (and anchors), noised."""
        return self._indexed_batch(latents, prompts, anchors)[0]

    def _indexed_batch(self, latents: torch.Tensor, prompts: list[str],
                       anchors: list[str] | None = None) -> tuple[Batch, np.ndarray]:
        """``_batch``, and the indices of this process's rows in ``latents``."""
        index = self.rng.integers(0, len(latents), self.config.batch_size)
        clean = latents[index]
        noisy, t, noise = self.noisy(clean)
        batch = Batch([prompts[i] for i in index], clean, noisy, t, noise, [anchors[i] for i in index] if anchors else [])
        rows = self.own_rows(len(index))
        return batch.rows(rows), index[rows]

    def own_rows(self, n: int) -> slice:
        """This process's contiguous share of a batch of ``n`` rows (all of them when alone)."""
        rank, processes = self.shard
        size = n // processes
        return slice(rank * size, (rank + 1) * size)

    def forget_batch(self) -> Batch:
        """A random batch of forget prompts (with their anchors) on the cached forget images."""
        return self._batch(self.forget_latents, self.forget_prompts, self.anchor_prompts)

    def paired_forget_batch(self, paired: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """``forget_batch``, and the rows of ``paired`` (index-aligned with the forget images) it drew."""
        batch, index = self._indexed_batch(self.forget_latents, self.forget_prompts, self.anchor_prompts)
        return batch, paired[index]

    @torch.no_grad()
    def retain_batch(self) -> Batch:
        """A random batch of retained prompts; the frozen model draws their images once per
        request (data-free, like the forget images)."""
        if self.retain_latents is None:
            self.retain_prompt_list = self.retain_prompts(self.config.forget_images)
            self.retain_latents = self.draw_latents(self.retain_prompt_list)
        return self._batch(self.retain_latents, self.retain_prompt_list)

    @torch.no_grad()
    def concept_batch(self) -> Batch:
        """A random batch of forget prompts (with their anchors) on images of the targets that
        the frozen model drew (once per request). Defences simulate attackers on these, never on
        the world's renders that the evaluation's attacks use."""
        if self.concept_latents is None:
            self.concept_latents = self.draw_latents(self.forget_prompts[:self.config.forget_images])
        return self._batch(self.concept_latents, self.forget_prompts, self.anchor_prompts)

    def anchored_pairs(self, targets: tuple[str, ...], n: int, avoid: tuple[str, ...] = (), anchor: str | None = None):
        """``n`` forget prompts of ``targets`` with their anchors: ``anchor`` in the target's place;
        else, with ``swap_anchors``, a random concept neither forgotten nor a target; else the
        prompt without the target. ``partial_prompts`` of the other attributes left out of both."""
        partial = self.config.partial_prompts
        if self.config.swap_anchors and not anchor:
            return self.prompts.random_anchor_pairs(targets, n, self.rng, avoid=avoid, partial=partial,
                                                    keep_out=self.context.forgotten)
        return self.prompts.forget_pairs(targets, anchor, n, self.rng, avoid=avoid, partial=partial)

    @torch.no_grad()
    def draw_latents(self, prompts: list[str], seed: int | None = None, pretrained: bool = False) -> torch.Tensor:
        """x_0 latents the frozen model draws for ``prompts`` (from ``seed``'s noise when given:
        two prompt lists drawn from one seed start every row from the same noise); with
        ``pretrained``, the model with the pretrained weights draws them, so concepts earlier
        requests erased are still in the images."""
        seed = int(self.rng.integers(2**31)) if seed is None else seed
        with self.frozen.swapped(self.context.base_weights) if pretrained else nullcontext(self.frozen) as model:
            images = model.sample(prompts, steps=self.config.sampling_steps, seed=seed)
        return self.frozen.to_latents(images, generator=self.generator)

    def denoising_loss(self, batch: Batch) -> torch.Tensor:
        """The DDPM objective of the trained model on ``batch``."""
        prediction = self.model.predict(batch.noisy, batch.t, self.encode(batch.prompts))
        return (prediction - self.model.training_target(batch.clean, batch.noise, batch.t)).pow(2).mean()

    def accumulate(self, loss: Callable[[], torch.Tensor], batches: int, squared: bool = False,
                   scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Summed gradients (or squared gradients) of ``loss()`` over the trained parameters,
        counted as backward passes; the weights do not change."""
        return accumulate_gradients(self.params, loss, batches, squared, scale, self.counter.count_backward)
