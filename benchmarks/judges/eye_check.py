"""Check attribute judges against eye labels on the images an evaluation draws for forgotten concepts.

    python benchmarks/judges/eye_check.py STORE --key NAME --judge shapes-judge --judge shapes-judge-v2
        [--base] [--grid disagreements.png]

draws every forget image of STORE's evaluation (training templates and short forms; the
`s10-final.md` settings: 18 prompts x 4 images a concept, evaluation seed 0), asks each judge
whether it shows its target, prints the counts per concept, and scores each judge on the images
`eye-labels.json` labels under NAME (Y: shows the target, N: does not, ?: cannot tell; unclear
ones are left out). `--grid` writes the images on which the first two judges disagree, captioned
with index and target only, in a shuffled order: label those without knowing which judge said what.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from obliviate.engine import Store
from obliviate.evaluation.evaluator import EvalConfig, Evaluator, _shows_target
from obliviate.models.zoo import load_judge
from obliviate.viz import image_grid

LABELS = Path(__file__).with_name("eye-labels.json")
SETTINGS = EvalConfig(forget_prompts=18, images_per_prompt=4, ua_splits="train", seed=0)


def forget_images(evaluator: Evaluator, model, forgotten) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every forget image of the evaluation, its target and its prompt form, in a fixed order."""
    images, targets, forms = [], [], []
    with torch.no_grad():
        for target, labels in evaluator.forget_labels(forgotten).items():
            group = evaluator.prompts.target_groups((target,))[0]
            for form in ("train", "short"):
                _, drawn, _ = evaluator._forget_images(model, labels, group, form)
                images.append(drawn.float().clamp(0, 1))
                targets += [target] * len(drawn)
                forms += [form] * len(drawn)
    return torch.cat(images), np.array(targets), np.array(forms)


def shows_target(judge, evaluator: Evaluator, images: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """Per image, does ``judge`` see its target, by the rule UA counts with."""
    predicted, shows = judge.predict(images), np.zeros(len(targets), dtype=bool)
    for target in dict.fromkeys(targets):
        rows = targets == target
        group = evaluator.prompts.target_groups((target,))[0]
        of_target = {d: p[torch.from_numpy(rows)] for d, p in predicted.items()}
        shows[rows] = _shows_target(of_target, group, evaluator.ontology).numpy()
    return shows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--key", required=True, help="the store's entry in eye-labels.json")
    parser.add_argument("--judge", action="append", required=True, help="zoo name or folder (repeatable)")
    parser.add_argument("--base", action="store_true", help="draw with the model the store started from")
    parser.add_argument("--grid", type=Path, help="write the first two judges' disagreements here, shuffled")
    args = parser.parse_args()
    store = Store(args.store)
    evaluator = Evaluator.for_store(store, SETTINGS)
    model = store.base_model() if args.base else store.load_model(check=False)
    images, targets, forms = forget_images(evaluator, model, store.forgotten())
    eye = json.loads(LABELS.read_text()).get(args.key, {}) if LABELS.is_file() else {}
    labelled = [(int(i), v == "Y") for i, v in eye.items() if v in "YN"]
    calls = {}
    for name in args.judge:
        calls[name] = shows = shows_target(load_judge(name), evaluator, images, targets)
        per_form = []
        for form in ("train", "short"):
            rows = forms == form
            per = {t: int(shows[rows & (targets == t)].sum()) for t in dict.fromkeys(targets)}
            per_form.append(f"{form} {int(shows[rows].sum())} ({', '.join(f'{t} {n}' for t, n in per.items() if n)})")
        right = sum(shows[i] == truth for i, truth in labelled)
        print(f"{name}: counted as showing the target: {'; '.join(per_form)}"
              + (f"; agrees with the eye on {right} of {len(labelled)} labelled images" if labelled else ""))
    if args.grid and len(args.judge) >= 2:
        a, b = (calls[name] for name in args.judge[:2])
        disagree = np.flatnonzero(a != b)
        np.random.default_rng(0).shuffle(disagree)
        if len(disagree):
            image_grid(images[disagree], [f"{i} {targets[i]}" for i in disagree], scale=3, caption_height=14).save(args.grid)
        print(f"{len(disagree)} disagreements written to {args.grid}: {' '.join(map(str, disagree))}")

if __name__ == "__main__":
    main()
