"""Linear probe for residual information: can a linear classifier on the UNet's middle-block
features tell a prompt that names the concept from the same prompt without it? A model that
truly forgot treats the two alike (probe near chance); compare with the retrain oracle's probe."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Attack, AttackResult, concept_renders, register_attack


@dataclass
class ProbeConfig:
    samples: int = field(default=128, metadata={"help": "prompt pairs (with / without the concept)"})
    timestep: int = field(default=300, metadata={"help": "noise level of the inputs"})
    iterations: int = field(default=300, metadata={"help": "probe training steps"})

    def __post_init__(self):
        if self.samples < 8 or self.iterations <= 0 or self.timestep < 0:
            raise ValueError("samples must be >= 8, iterations positive, timestep >= 0")


@torch.no_grad()
def mid_block_features(model, latents, timesteps, encoding) -> torch.Tensor:
    captured = []
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o.mean(dim=(2, 3))))
    try:
        model.predict(latents, timesteps, encoding)
    finally:
        handle.remove()
    return captured[0].float().cpu()


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, iterations: int, seed: int) -> float:
    """Held-out accuracy of a logistic-regression probe (70/30 split, standardised features)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    split = int(0.7 * len(labels))
    train, test = order[:split], order[split:]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(iterations):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[train] @ weight + bias, labels[train].float())
        loss = loss + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((((x[test] @ weight + bias) > 0).long() == labels[test]).float().mean())


@register_attack
class ProbeAttack(Attack):
    name = "probe"
    description = "linear probe on UNet mid-block features: does the concept word still change them?"
    config_class = ProbeConfig

    def run(self, model, concept, judge, prompts, seed=0) -> AttackResult:
        cfg = self.config
        pairs = prompts.forget_pairs((concept,), None, cfg.samples, np.random.default_rng(seed))
        images, _ = concept_renders(prompts, concept, cfg.samples, seed)
        gen = torch.Generator().manual_seed(seed)
        clean = model.to_latents(images)
        noise = torch.randn(clean.shape, generator=gen).to(clean)
        t = torch.full((len(clean),), cfg.timestep, device=clean.device)
        noisy = model.scheduler.add_noise(clean, noise, t)
        with_concept = mid_block_features(model, noisy, t, model.encode([p.target for p in pairs]))
        without = mid_block_features(model, noisy, t, model.encode([p.anchor for p in pairs]))
        features = torch.cat([with_concept, without])
        labels = torch.cat([torch.ones(len(pairs)), torch.zeros(len(pairs))]).long()
        accuracy = probe_accuracy(features, labels, cfg.iterations, seed)
        return AttackResult(self.name, concept, before=0.5, after=accuracy, details={"probe_accuracy": accuracy, "chance": 0.5})
