"""The main job on the embedded world (``make demo``):

1. what the world looks like next to what the shipped model draws for the same prompts, and the
   judge's per-domain accuracy of the model;
2. a short sequence of deletion requests applied to a store, evaluated after each;
3. a relearning attack on the first forgotten concept, and the HTML report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .engine import Store
from .evaluation.attacks import get_attack
from .evaluation.evaluator import EvalConfig, Evaluator
from .evaluation.quality import balanced_combinations, judge_t2i, model_language
from .models.zoo import DEFAULT_T2I, load_judge, load_t2i
from .report import write_report
from .viz import image_grid
from .world import DEFAULT_ONTOLOGY, prompt_for, render, sample_scenes

# the methods that kept retention best in benchmarks/s1.md
DEMO_REQUESTS = (("striped", "sdwv", {}), ("triangle", "uce", {}))


def real_vs_generated(model, labels: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Alternating columns of a real render and a generated image for the same prompt."""
    prompts = [prompt_for(tuple(row), lang=model_language(model)) for row in labels]
    scenes = sample_scenes(len(labels), seed, shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2])
    real = torch.from_numpy(render(scenes))
    generated = model.sample(prompts, seed=seed)
    images = torch.stack([real, generated], 1).flatten(0, 1)
    captions = [c for p in prompts for c in ("render: " + p, "model")]
    return images, captions


def run_demo(out: Path, quick: bool = False, echo=print, print_quality=None, print_status=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, judge = load_t2i(DEFAULT_T2I), load_judge()

    echo("1/3 the world and the shipped model")
    images, captions = real_vs_generated(model, balanced_combinations(8 if quick else 24, DEFAULT_ONTOLOGY))
    image_grid(images, captions, columns=8, scale=4, caption_height=14).save(out / "real_vs_generated.png")
    echo(f"wrote {out / 'real_vs_generated.png'} (pairs: a render, then the model's image for its prompt)")
    quality = judge_t2i(model, judge, n_prompts=10 if quick else 20, images_per_prompt=2 if quick else 4)
    (out / "quality.json").write_text(json.dumps(quality, indent=2))
    if print_quality:
        print_quality(quality)

    echo("2/3 deletion requests, evaluated after each")
    store_dir = out / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store.init(store_dir, DEFAULT_T2I)
    eval_config = EvalConfig(forget_prompts=4 if quick else 8, retain_prompts=16 if quick else 40, images_per_prompt=2)
    evaluator = Evaluator.for_store(store, eval_config)
    store.evaluate(evaluator)  # the base model's row
    for target, method, options in DEMO_REQUESTS[:1] if quick else DEMO_REQUESTS:
        rid = store.add_request([target], method, options)
        echo(f"  request {rid}: forget {target!r} with {method}")
    for outcome in store.apply(evaluator=evaluator):
        m = outcome.metrics
        echo(f"  request {outcome.request_id}: UA {m['ua']:.3f} on names, {m['ua_train_synonym']:.3f} on training synonyms, "
             f"{m['ua_heldout_template']:.3f} on held-out templates, {m['ua_heldout_synonym']:.3f} on held-out synonyms; "
             f"IRA {m['ira']:.3f}, CRA {m['cra']:.3f}, FD {m['fd']:.2f}, {outcome.cost['seconds']:.1f}s")
    if print_status:
        print_status(store_dir)

    echo("3/3 does it come back? a relearning and a paraphrase attack, then the report")
    target = DEMO_REQUESTS[0][0]
    attack = get_attack("relearn").from_options({"checkpoints": (0, 5) if quick else (0, 5, 10, 20),
                                                 "prompts": 4 if quick else 8, "images_per_prompt": 2 if quick else 4})
    result = store.attack(attack, target, judge)
    for name, res in [("unlearned model", result)] + ([("retrain oracle", result.oracle)] if result.oracle else []):
        echo(f"  relearn {target!r} on the {name}: judge sees it in {res.before:.1%} of images, "
             + ", ".join(f"{rate:.1%} after {steps} steps" for steps, rate in res.curve[1:]))
    paraphrase = get_attack("paraphrase").from_options({"candidates": 16 if quick else 32, "screen_images": 2, "top": 2,
                                                        "prompts": 4, "images_per_prompt": 2 if quick else 4})
    reworded = store.attack(paraphrase, target, judge)
    for name, res in [("unlearned model", reworded)] + ([("retrain oracle", reworded.oracle)] if reworded.oracle else []):
        best = res.details["best_prompts"][0]
        echo(f"  paraphrase {target!r} on the {name}: {res.before:.1%} with the request's words, {res.after:.1%} with "
             f"the strongest of {res.details['screened']} wordings ({best['prompt']!r})")
    report = write_report(store, out / "report.html", images_per_concept=4)
    echo(f"wrote {report}")
    return {"quality": quality, "status": store.status(), "attack": result.to_dict(), "paraphrase": reworded.to_dict()}
