"""The main job on the embedded world (``make demo``): what the world looks like, what the
shipped model draws for the same prompts, and how the judge scores it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .evaluation.quality import balanced_combinations, judge_t2i
from .models.zoo import load_judge, load_t2i
from .viz import image_grid
from .world import DEFAULT_ONTOLOGY, prompt_for, render, sample_scenes


def real_vs_generated(model, labels: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Alternating columns of a real render and a generated image for the same prompt."""
    prompts = [prompt_for(tuple(row)) for row in labels]
    scenes = sample_scenes(len(labels), seed, shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2])
    real = torch.from_numpy(render(scenes))
    generated = model.sample(prompts, seed=seed)
    images = torch.stack([real, generated], 1).flatten(0, 1)
    captions = [c for p in prompts for c in ("render: " + p, "model")]
    return images, captions


def run_demo(out: Path, quick: bool = False, echo=print, print_quality=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, judge = load_t2i("shapes-t2i"), load_judge("shapes-judge")
    images, captions = real_vs_generated(model, balanced_combinations(8 if quick else 24, DEFAULT_ONTOLOGY))
    image_grid(images, captions, columns=8, scale=4, caption_height=14).save(out / "real_vs_generated.png")
    echo(f"wrote {out / 'real_vs_generated.png'} (pairs: render, then the model's image for its prompt)")
    quality = judge_t2i(model, judge, n_prompts=10 if quick else 40, images_per_prompt=4 if quick else 16)
    (out / "quality.json").write_text(json.dumps(quality, indent=2))
    if print_quality:
        print_quality(quality)
    echo(f"wrote {out / 'quality.json'}")
    return quality
