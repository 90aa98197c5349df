"""Training a classifier from its recipe: the shipped models, and the retrain oracle (the same
recipe and seed on the training data minus what was forgotten)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .models import ClassifierModel
from .targets import DataTargets
from ..seeding import seeded_by_recipe


@dataclass
class ClassifierRecipe:
    dataset: str = "digits"
    arch: str = "cnn"
    arch_config: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0 or self.learning_rate <= 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")


@seeded_by_recipe
def train_classifier(recipe: ClassifierRecipe, exclude: tuple[str, ...] = (), device=None, log=None) -> ClassifierModel:
    """Train from scratch on the dataset's training split without the ``exclude`` targets."""
    model = ClassifierModel.build(recipe.arch, recipe.dataset, recipe.arch_config, asdict(recipe))
    device = device or torch.device("cpu")
    model.to(device).net.train()
    data = DataTargets(recipe.dataset).split(tuple(exclude))
    x, y = data.retain_x.to(device), data.retain_y.to(device)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(x) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    start = time.time()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for i in range(0, len(x), recipe.batch_size):
            batch = order[i:i + recipe.batch_size]
            loss = nn.functional.cross_entropy(model.net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{recipe.epochs} loss {loss.item():.3f} ({time.time() - start:.1f}s)")
    model.recipe["train_seconds"] = round(time.time() - start, 3)
    return model.to("cpu").eval()


# The recipes of the classifiers in the zoo (``obliviate zoo train NAME``).
ZOO_RECIPES = {
    "digits-cnn": ClassifierRecipe(dataset="digits", arch="cnn"),
    "digits-vit": ClassifierRecipe(dataset="digits", arch="vit"),
    "shapes-cnn": ClassifierRecipe(dataset="shapes", arch="cnn", epochs=30, learning_rate=3e-3),
}
