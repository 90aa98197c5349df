"""Text-agnostic erasure in the manner of SafeGen (Li et al., CCS 2024): train the denoiser itself,
whatever the prompt says, to turn a noisy image of the target into the same image without it.

An erasure that reroutes the words leaves the denoiser able to draw the concept, and a soft
prompt finds the way back. Here the pairs (x_0, x'_0) are images the frozen model draws for a
forget prompt and for its anchor prompt from the same noise ("a red circle" / "a blue circle":
one scene, the target swapped; without a request anchor, a random retained concept of the
target's domain). x_t is noised from x_0 with noise eps, and the denoiser learns the
output that leads to the clean x'_0 instead:

    eps' = (x_t - sqrt(abar_t) x'_0) / sqrt(1 - abar_t)
    L_forget = (1 - abar_t) || f_theta(x_t, c, t) - y(x'_0, eps', t) ||^2

with y the model's training target (eps' itself, or the velocity of x'_0 and eps'), and the
condition c the target prompt, the anchor prompt or the empty prompt, drawn at random for each row,
so neither the words nor their absence lead back to the concept. The weight 1 - abar_t keeps the
rows near t = 0, whose target grows like 1/sqrt(1 - abar_t), from dominating: it is the error of
the predicted x_0 weighted by abar_t. Retained prompts keep their plain denoising objective on
images the frozen model draws for them:

    L = L_forget + retain_weight * || f_theta(x_t, c_r, t) - y(x_0r, eps, t) ||^2.

SafeGen trains the self-attention layers on the empty prompt only; by default this trains every
layer outside cross-attention, where what the image looks like is decided whatever the text says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..training import Batch, GradientConfig
from .base import register_method
from .gradient import GradientMethod


@dataclass
class SafeGenConfig(GradientConfig):
    trainable: str = field(default="non-xattn", metadata={"help": "parameters that train: a preset or a regex"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    forget_images: int = field(default=256, metadata={
        "help": "image pairs the frozen model draws (target, anchor), and as many retained images"})
    retain_weight: float = field(default=1.0, metadata={
        "help": "weight of the denoising loss on retained prompts' images (0: none)"})

    def __post_init__(self):
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        super().__post_init__()


def substitute_target(model, noisy: torch.Tensor, substitute: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The training target that denoises ``noisy`` (x_t at timesteps ``t``) into the clean
    ``substitute`` x'_0: the target for x'_0 with the noise eps' that x_t implies."""
    abar = model.alpha_bar(t, noisy)
    implied_noise = (noisy - abar.sqrt() * substitute) / (1 - abar).sqrt()
    return model.training_target(substitute, implied_noise, t)


@register_method
class SafeGen(GradientMethod):
    name = "safegen"
    description = "text-agnostic: the denoiser turns noisy images of the target into the anchor's, under any prompt (SafeGen)"
    config_class = SafeGenConfig
    random_anchors = True  # an anchor that only drops the target leaves the frozen model free to draw it anyway

    def draw_forget_latents(self, session) -> torch.Tensor:
        """Images of the targets, and (kept for the loss) the anchors' images from the same noise."""
        n, seed = session.config.forget_images, int(session.rng.integers(2**31))
        self.substitutes = session.draw_latents(session.anchor_prompts[:n], seed=seed)
        self.originals = session.draw_latents(session.forget_prompts[:n], seed=seed)
        return self.originals

    def paired_batch(self, session) -> tuple[Batch, torch.Tensor]:
        """A random batch of forget rows (this process's share) and each row's substitute x'_0."""
        if session.forget_latents is not self.originals:
            raise ValueError("safegen's loss pairs each forget image with its anchor's image from the same noise; "
                             "a regularizer that runs it on other images (rehearse:objective=method) has no pairs. "
                             "Use rehearse's default objective with safegen.")
        return session.paired_forget_batch(self.substitutes)

    def loss(self, session) -> torch.Tensor:
        batch, substitutes = self.paired_batch(session)
        size = session.config.batch_size  # drawn for the whole batch, as every process does
        choice = session.rng.integers(0, 3, size)[session.own_rows(size)]  # target prompt, anchor prompt, empty prompt
        conditions = [(p, a, "")[c] for p, a, c in zip(batch.prompts, batch.anchors, choice)]
        target = substitute_target(session.model, batch.noisy, substitutes, batch.t)
        prediction = session.model.predict(batch.noisy, batch.t, session.encode(conditions))
        loss = ((1 - session.model.alpha_bar(batch.t, batch.noisy)) * (prediction - target).pow(2)).mean()
        if self.config.retain_weight:
            loss = loss + self.config.retain_weight * session.denoising_loss(session.retain_batch())
        return loss
