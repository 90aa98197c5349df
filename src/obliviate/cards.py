"""Installing a trained run into the zoo, with a model card that states how it was made and
how good it is."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch

from .models.zoo import ZOO


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{torch.get_num_threads()} CPU threads ({cpu}), torch {torch.__version__}"


def install_t2i(run: Path, quality: dict) -> Path:
    """Copy ``run/model`` into the package's weights and write its card."""
    entry = ZOO["shapes-t2i"]
    state = json.loads((run / "train_state.json").read_text())
    target = entry.path
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target)
    from .models.t2i import T2IModel
    params = sum(p.numel() for p in T2IModel.load(target).unet.parameters())
    recipe = state["recipe"]
    rows = "\n".join(f"| {split} | {quality[split]['shape']:.3f} | {quality[split]['colour']:.3f} | "
                     f"{quality[split]['texture']:.3f} | {quality[split]['fd']:.2f} |"
                     for split in ("train", "heldout_template", "heldout_synonym"))
    card = f"""# shapes-t2i

A text-to-image diffusion model of obliviate's embedded concept world: a diffusers
`UNet2DConditionModel` with cross-attention over per-token MiniLM (all-MiniLM-L6-v2) states, in
pixel space at 32x32, v-prediction with a cosine schedule, EMA weights.

| | |
|---|---|
| UNet parameters | {params:,} |
| training steps | {state['step']} x batch {recipe['batch_size']} (fresh renders every step) |
| learning rate | {recipe['learning_rate']} (AdamW, warm-up {recipe['warmup_steps']}, cosine to 10%), EMA {recipe['ema_decay']} |
| prompt dropout | {recipe['prompt_dropout']} (for classifier-free guidance, scale {recipe['guidance_scale']}) |
| wall time | {state['seconds'] / 60:.1f} min on {state['device']} (as measured; other load on the machine counts) |
| hardware | {_hardware()} |
| seed | {recipe['seed']} |

Reproduce: `obliviate zoo train shapes-t2i --out runs/shapes-t2i` then
`obliviate zoo install shapes-t2i --run runs/shapes-t2i` (this file is written by the latter).

## Quality, by the shipped judge (`obliviate judge shapes-t2i --json`)

{quality['n_prompts']} prompts covering every concept, {quality['images_per_prompt']} images per prompt,
sampler {quality['sampler']}, guidance {quality['guidance_scale']}. Accuracy is the share of images whose
attribute the judge reads as the prompt's; FD is the Fréchet distance of judge features to renders.

| prompts | shape | colour | texture | FD |
|---|---|---|---|---|
{rows}

Held-out templates were never seen in training. Held-out synonyms measure the text encoder more
than the model: MiniLM places an unseen synonym ("crimson") no closer to the trained word ("red")
than to other colours, so no bar is set for them.
"""
    (target / "MODEL_CARD.md").write_text(card)
    (target / "quality.json").write_text(json.dumps(quality, indent=2))
    return target


def install_oracle(run: Path, oracle: dict, base: dict) -> Path:
    """Copy the retrain oracle ``run/model`` (a ``zoo train shapes-t2i --exclude`` run) to the
    shipped oracles, with a card comparing its evaluation (``oracle``) with the base model's
    (``base``) on the same prompts."""
    from .models.zoo import SHIPPED_ORACLES, oracle_key
    state = json.loads((run / "train_state.json").read_text())
    excluded = state["recipe"]["exclude"]
    target = SHIPPED_ORACLES / oracle_key(excluded)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target / "model")
    rows = "\n".join(f"| {name} | {m['ua']:.3f} | {m['ira']:.3f} | {m['cra']:.3f} | {m['fd']:.2f} |"
                     for name, m in (("retrain oracle", oracle), ("shapes-t2i (base)", base)))
    config = oracle["eval_config"]
    card = f"""# Retrain oracle of shapes-t2i without {', '.join(excluded)}

shapes-t2i's recipe and seed, rerun on renders that never show {', '.join(excluded)}: the gold
standard an unlearning method is compared with ("gap to retrain"), and the reference curve for
attacks (`obliviate attack` runs the same attack on it).

| | |
|---|---|
| training steps | {state['step']} x batch {state['recipe']['batch_size']} |
| wall time | {state['seconds'] / 60:.1f} min on {state['device']} (as measured; other load on the machine counts) |
| hardware | {_hardware()} |

Reproduce: `obliviate zoo train shapes-t2i --exclude {' --exclude '.join(excluded)}` then
`obliviate zoo install shapes-t2i --run {run}` (this file is written by the latter).

## Evaluation ({config['forget_prompts']} prompts x {config['images_per_prompt']} images per forgotten concept, {config['retain_prompts']} retained prompts)

| model | UA | IRA | CRA | FD |
|---|---|---|---|---|
{rows}
"""
    (target / "MODEL_CARD.md").write_text(card)
    (target / "evaluation.json").write_text(json.dumps({"oracle": oracle, "base": base}, indent=2))
    return target


def install_judge(run: Path) -> Path:
    entry = ZOO["shapes-judge"]
    target = entry.path
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("judge.json", "judge.safetensors"):
        shutil.copy2(run / name, target / name)
    config = json.loads((run / "judge.json").read_text())
    acc = config["heldout_render_accuracy"]
    recipe = config["recipe"]
    (target / "MODEL_CARD.md").write_text(f"""# shapes-judge

An attribute classifier of the embedded world: a small CNN (width {config['width']}) with one
head per domain; its {config['feature_dim']}-d penultimate features feed the Fréchet distance.

| | |
|---|---|
| training | {recipe['steps']} steps x batch {recipe['batch_size']} of fresh renders, AdamW one-cycle lr {recipe['learning_rate']}, noise augmentation {recipe['augment_noise']} |
| wall time | {config['seconds'] / 60:.1f} min on {config['device']} ({_hardware()}) |
| seed | {recipe['seed']} |
| held-out render accuracy (4096 renders) | shape {acc['shape']:.4f}, colour {acc['colour']:.4f}, texture {acc['texture']:.4f} |

Reproduce: `obliviate zoo train shapes-judge --out runs/shapes-judge` then
`obliviate zoo install shapes-judge --run runs/shapes-judge`.
""")
    return target


def install_classifier(name: str, run: Path) -> Path:
    """Copy ``run/model`` (a ClassifierModel) into the package's weights with a card stating its
    recipe and accuracy on the dataset's fixed splits."""
    from .classifiers.models import ClassifierModel
    from .classifiers.targets import DataTargets
    from .evaluation.classifier import accuracy
    target = ZOO[name].path
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target)
    model = ClassifierModel.load(target)
    split = DataTargets(model.dataset).split(())
    params = sum(p.numel() for p in model.net.parameters())
    recipe = "\n".join(f"| {k} | {v} |" for k, v in model.recipe.items())
    card = f"""# {name}

{ZOO[name].description}. Architecture `{model.arch}` ({params:,} parameters), dataset
`{model.dataset}` with obliviate's fixed stratified split. Reproduce with
`obliviate zoo train {name}` then `obliviate zoo install {name} --run runs/{name}`.

| split | accuracy |
|---|---|
| train ({len(split.retain_y)}) | {accuracy(model, split.retain_x, split.retain_y):.4f} |
| test ({len(split.test_y)}) | {accuracy(model, split.test_x, split.test_y):.4f} |

Recipe (also stored in `obliviate.json`; the retrain oracle reruns it without the forgotten data):

| option | value |
|---|---|
{recipe}

Trained on {_hardware()}.
"""
    (target / "MODEL_CARD.md").write_text(card)
    return target
