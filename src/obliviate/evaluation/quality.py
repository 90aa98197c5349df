"""How well a text-to-image model draws the world, by the judge: per-domain accuracy on each
prompt split, and the Fréchet distance of judge features to real renders."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..world import DEFAULT_LANGUAGE, DEFAULT_ONTOLOGY, SPLITS, Language, Ontology, language, prompt_for, render, sample_scenes
from .metrics import Accuracy, FrechetDistance


def balanced_combinations(n: int, ontology: Ontology = DEFAULT_ONTOLOGY) -> np.ndarray:
    """n (shape, colour, texture) label rows where every concept appears about equally often:
    row i is (i mod |shapes|, i mod |colours|, i mod |textures|)."""
    counts = [len(ontology.in_domain(d)) for d in ontology.domains]
    return np.array([[i % c for c in counts] for i in range(n)])


def model_language(model) -> Language:
    """The world language a model was trained on; the default one for a model that names none."""
    return language(model.language) if model.language else DEFAULT_LANGUAGE


@torch.no_grad()
def generate_and_judge(model, judge, labels: np.ndarray, split: str, images_per_prompt: int, seed: int,
                       steps: int, solver: str, ontology: Ontology = DEFAULT_ONTOLOGY):
    """Sample ``images_per_prompt`` images for each label row's prompt; returns (images, label
    rows repeated per image, judge predictions per domain, judge features). Prompts are in the
    model's own language, so ``train`` means the templates and words it was trained on."""
    prompts = split_prompts(model, labels, split, ontology)
    images, predicted, features = sample_and_judge(model, judge, prompts, images_per_prompt, seed, steps, solver, ontology)
    return images, np.repeat(labels, images_per_prompt, axis=0), predicted, features


def split_prompts(model, labels: np.ndarray, split: str, ontology: Ontology = DEFAULT_ONTOLOGY) -> list[str]:
    """One prompt of ``split`` per label row, in the model's own language (row i takes variant i)."""
    lang = model_language(model)
    return [prompt_for(tuple(row), split, variant=i, ontology=ontology, lang=lang) for i, row in enumerate(labels)]


@torch.no_grad()
def sample_and_judge(model, judge, prompts: list[str], images_per_prompt: int, seed: int, steps: int, solver: str,
                     ontology: Ontology = DEFAULT_ONTOLOGY):
    """``images_per_prompt`` images of each prompt; returns (images, judge predictions per
    domain, judge features)."""
    repeated = [p for p in prompts for _ in range(images_per_prompt)]
    images = model.sample(repeated, steps=steps, seed=seed, solver=solver)
    device = next(judge.parameters()).device
    features = torch.cat([judge.features(images[i:i + 512].to(device)).cpu() for i in range(0, len(images), 512)])
    predicted = {d: judge.heads[d](features.to(device)).argmax(-1).cpu() for d in ontology.domains}
    return images, predicted, features


@torch.no_grad()
def real_features(judge, n: int, seed: int = 12345, ontology: Ontology = DEFAULT_ONTOLOGY) -> torch.Tensor:
    images = torch.from_numpy(render(sample_scenes(n, seed, ontology=ontology), ontology))
    device = next(judge.parameters()).device
    return torch.cat([judge.features(images[i:i + 512].to(device)).cpu() for i in range(0, n, 512)])


def judge_t2i(model, judge, n_prompts: int = 40, images_per_prompt: int = 16, splits=SPLITS, steps: int = 20,
              solver: str = "dpm", seed: int = 0, ontology: Ontology = DEFAULT_ONTOLOGY) -> dict:
    """Per-domain judge accuracy of generated images for every split with its FD to renders, and
    per concept (``per_concept``: accuracy in the concept's domain on its prompts)."""
    start = time.time()
    labels = balanced_combinations(n_prompts, ontology)
    reference = real_features(judge, max(1024, n_prompts * images_per_prompt), ontology=ontology)
    result = {"n_prompts": n_prompts, "images_per_prompt": images_per_prompt, "sampler": f"{solver}-{steps}",
              "guidance_scale": model.guidance_scale}
    for split in splits:
        _, rows, predicted, features = generate_and_judge(model, judge, labels, split, images_per_prompt, seed, steps, solver, ontology)
        scores = {}
        for i, domain in enumerate(ontology.domains):
            metric = Accuracy()
            metric.update(predicted[domain], torch.from_numpy(rows[:, i]))
            scores[domain] = round(metric.compute(), 4)
        scores["per_concept"] = {}
        for i, domain in enumerate(ontology.domains):
            for index, name in enumerate(ontology.names(domain)):
                shown = rows[:, i] == index
                if shown.any():
                    hits = predicted[domain][torch.from_numpy(shown)] == index
                    scores["per_concept"][name] = round(float(hits.float().mean()), 4)
        fd = FrechetDistance(judge.num_features)
        fd.update(reference, real=True)
        fd.update(features, real=False)
        scores["fd"] = round(fd.compute(), 3)
        result[split] = scores
    result["seconds"] = round(time.time() - start, 1)
    return result
