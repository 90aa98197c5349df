"""Fine-tuning attacks share one schedule: fine-tune a copy of the model on some images for n
steps and measure, after each checkpoint, how often the judge sees the forgotten concept. What
the attacker fine-tunes (full weights or a LoRA), with which optimizer and learning rate, is
configuration, so a defence can be tested under recipes it was not trained against."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ...seeding import seeded
from ...training import OPTIMIZERS, TRAINABLE_PRESETS, select_parameters
from .base import ProbeSettings, curve_auc, render_rows


@dataclass
class FineTuneSettings(ProbeSettings):
    renders: int = field(default=16, metadata={"help": "k, renders to fine-tune on"})
    checkpoints: tuple[int, ...] = field(default=(0, 5, 10, 20, 50), metadata={"help": "step counts at which to measure"})
    optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={"help": "adam or sgd"})
    learning_rate: float = field(default=1e-4, metadata={"help": "the optimizer's learning rate"})
    batch_size: int = field(default=8, metadata={"help": "renders per step"})
    trainable: str = field(default="all", metadata={
        "help": f"what the attacker trains: a preset ({', '.join(TRAINABLE_PRESETS)}) or a regex over UNet parameter names"})
    lora_rank: int = field(default=0, metadata={
        "help": "0: fine-tune the chosen weights themselves; r > 0: a peft LoRA of rank r on the attention projections"})
    data: str = field(default="renders", metadata={
        "help": "'renders' (the world's own images) or a model (zoo name or folder) whose drawings are the data, "
                "e.g. the store's base model"})

    def __post_init__(self):
        if self.renders <= 0 or self.batch_size <= 0 or not self.checkpoints or min(self.checkpoints) < 0:
            raise ValueError("renders and batch_size must be positive and checkpoints non-negative step counts")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.learning_rate <= 0 or self.lora_rank < 0:
            raise ValueError("learning_rate must be positive and lora_rank >= 0")
        if self.data != "renders":
            from ...models.zoo import resolve_model_path
            resolve_model_path(self.data)  # names what is wrong with a model that is not there


def attack_images(settings: FineTuneSettings, prompts, labels, texts: list[str], seed: int) -> torch.Tensor:
    """The attacker's images for label rows: the world's renders of them, or the drawings of the
    model named by ``settings.data`` for ``texts``. Either way they are made from the attack's
    own seed, so they are never the images a defence drew while the model was trained."""
    if settings.data == "renders":
        return render_rows(prompts, labels, seed)
    from ...models.zoo import load_t2i
    return load_t2i(settings.data).sample(texts, steps=settings.sampling_steps, seed=seed, solver="dpm")


def attacker_copy(model, settings: FineTuneSettings, seed: int = 0):
    """A copy of ``model`` whose UNet the attacker may change, and the parameters it trains. A
    LoRA starts from ``seed``, not from whatever the process drew before."""
    attacked = copy.copy(model)
    attacked.unet = copy.deepcopy(model.unet).requires_grad_(False)
    if settings.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        with seeded(seed):  # peft draws the down-projections from torch's global generator
            inject_adapter_in_model(LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, target_modules=targets),
                                    attacked.unet)
        pattern = r"lora_"
    else:
        pattern = TRAINABLE_PRESETS.get(settings.trainable, settings.trainable)
    params = select_parameters(attacked.unet, pattern)
    for p in params.values():
        p.requires_grad_(True)
    return attacked, params


def fine_tune_curve(model, images: torch.Tensor, texts: list[str], settings: FineTuneSettings,
                    measure: Callable[[object], float], seed: int) -> tuple[tuple[int, float], ...]:
    """Fine-tune a copy of ``model`` on (images, texts) with the denoising loss and return
    ``(steps, measure(copy))`` at every checkpoint. ``model`` itself never changes."""
    attacked, params = attacker_copy(model, settings, seed)
    optimizer = OPTIMIZERS[settings.optimizer](list(params.values()), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    clean_all = attacked.to_latents(images)
    curve, done = [], 0
    for target in sorted(set(settings.checkpoints)):
        attacked.unet.train()
        for _ in range(target - done):
            index = torch.randint(0, len(texts), (settings.batch_size,), generator=generator)
            loss = attacked.denoising_loss(clean_all[index], attacked.encode([texts[i] for i in index]), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        done = target
        attacked.unet.eval()
        curve.append((target, measure(attacked)))
    return tuple(curve)


def curve_details(settings: FineTuneSettings, curve) -> dict:
    """What a fine-tuning attack records beside its curve: the relearnability score (its area,
    ``curve_auc``) and the attacker's recipe."""
    return {"auc": curve_auc(curve), "renders": settings.renders, "optimizer": settings.optimizer, "learning_rate": settings.learning_rate,
            "trained": f"lora r={settings.lora_rank}" if settings.lora_rank else settings.trainable}
