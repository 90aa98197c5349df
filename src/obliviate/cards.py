"""Installing a trained run into the zoo, with a model card that states how it was made and
how good it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .environment import hardware
from .models.zoo import ZOO
from .world import DEFAULT_ONTOLOGY, SPLITS, language

if TYPE_CHECKING:
    from .evaluation.lexical import WordReadout


def install_t2i(name: str, run: Path, quality: dict, comparison: dict | None = None) -> Path:
    """Copy ``run/model`` into the package's weights as zoo model ``name`` and write its card;
    ``comparison`` (another model's ``judge_t2i`` result, e.g. the previous version's) gets its own
    rows in the quality table."""
    entry = ZOO[name]
    state = json.loads((run / "train_state.json").read_text())
    target = entry.path
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target)
    from .evaluation.lexical import heldout_word_readout
    from .models.t2i import T2IModel
    installed = T2IModel.load(target)
    params = sum(p.numel() for p in installed.unet.parameters())
    recipe = state["recipe"]
    lang = language(recipe.get("language", "v1"))
    table = [(name, quality)] + ([(comparison["model"], comparison)] if comparison else [])
    rows = "\n".join(f"| {model} | {split} | {q[split]['shape']:.3f} | {q[split]['colour']:.3f} | "
                     f"{q[split]['texture']:.3f} | {q[split]['fd']:.2f} |"
                     for model, q in table for split in SPLITS if split in q)
    synonyms = sum(len(lang.synonyms_of(c)) for c in DEFAULT_ONTOLOGY.concepts) / len(DEFAULT_ONTOLOGY.concepts)
    card = f"""# {name}

A text-to-image diffusion model of obliviate's embedded concept world: a diffusers
`UNet2DConditionModel` with cross-attention over per-token MiniLM (all-MiniLM-L6-v2) states, in
pixel space at 32x32, v-prediction with a cosine schedule, EMA weights. It reads prompts in world
language `{lang.name}`: {len(lang.templates)} templates, {synonyms:.1f} training synonyms a concept on average
(`obliviate world concepts` lists them; held-out templates and synonyms are never trained on).

| | |
|---|---|
| UNet parameters | {params:,} |
| training steps | {state['step']} x batch {recipe['batch_size']} (fresh renders every step) |
| prompts | {recipe['prompts_per_combination']} per (shape, colour, texture) combination, encoded once |
| learning rate | {recipe['learning_rate']} (AdamW, warm-up {recipe['warmup_steps']}, cosine to 10%), EMA {recipe['ema_decay']} |
| prompt dropout | {recipe['prompt_dropout']} (for classifier-free guidance, scale {recipe['guidance_scale']}) |
| wall time | {state['seconds'] / 60:.1f} min on {state['device']} (as measured; other load on the machine counts) |
| hardware | {state.get('hardware') or hardware()} |
| seed | {recipe['seed']} |

Reproduce: `obliviate zoo train {name} --out runs/{name}` then
`obliviate zoo install {name} --run runs/{name}` (this file is written by the latter).

## Quality, by the shipped judge (`obliviate judge {name} --json`)

{quality['n_prompts']} prompts covering every concept, {quality['images_per_prompt']} images per prompt,
sampler {quality['sampler']}, guidance {quality['guidance_scale']}. Accuracy is the share of images whose
attribute the judge reads as the prompt's; FD is the Fréchet distance of judge features to renders.
Each model is judged in its own language (`train`: its templates with concept names;
`train_synonym`: its templates with its training synonyms).

| model | prompts | shape | colour | texture | FD |
|---|---|---|---|---|---|
{rows}

{heldout_words_section(quality, heldout_word_readout(installed.text_encoder, lang))}"""
    (target / "MODEL_CARD.md").write_text(card)
    (target / "quality.json").write_text(json.dumps(quality, indent=2))
    return target


def heldout_words_section(quality: dict, readout: "WordReadout") -> str:
    """The card's per-word table: how often the model draws each held-out synonym's concept, and how
    often a probe reading the frozen encoder's states of the word names it."""
    drawn = quality.get("heldout_synonym", {}).get("per_concept", {})
    rows = "\n".join(f"| {c.name} | {word} | {drawn[c.name]:.2f} | {readout.per_word[word]:.2f} |"
                     for c in DEFAULT_ONTOLOGY.concepts if c.name in drawn for word in c.heldout_synonyms[:1])
    return f"""## Held-out synonyms, one by one

`drawn`: the judge's accuracy in the word's domain on prompts that use it (never trained on).
`encoder readout`: how often a small MLP that reads the frozen MiniLM token states of a word, trained
on every word the language knows, names the held-out word's concept (`obliviate bench-words`). The
model can only draw what those states carry; the readout estimates how much that is (per domain:
{", ".join(f"{d} {v:.2f}" for d, v in readout.per_domain.items())}).

| concept | held-out word | drawn | encoder readout |
|---|---|---|---|
{rows}
"""


def install_oracle(name: str, run: Path, oracle: dict, base: dict) -> Path:
    """Copy the retrain oracle ``run/model`` (a ``zoo train NAME --exclude`` run of zoo model
    ``name``) to the shipped oracles of its language, with a card comparing its evaluation
    (``oracle``) with the base model's (``base``) on the same prompts."""
    from .models.zoo import SHIPPED_ORACLES, oracle_key
    state = json.loads((run / "train_state.json").read_text())
    excluded = state["recipe"]["exclude"]
    target = SHIPPED_ORACLES / state["recipe"].get("language", "v1") / oracle_key(excluded)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target / "model")
    rows = "\n".join(f"| {model} | {m['ua']:.3f} | {m['ira']:.3f} | {m['cra']:.3f} | {m['fd']:.2f} |"
                     for model, m in (("retrain oracle", oracle), (f"{name} (base)", base)))
    config = oracle["eval_config"]
    card = f"""# Retrain oracle of {name} without {', '.join(excluded)}

{name}'s recipe and seed, rerun on renders that never show {', '.join(excluded)}: the gold
standard an unlearning method is compared with ("gap to retrain"), and the reference curve for
attacks (`obliviate attack` runs the same attack on it).

| | |
|---|---|
| training steps | {state['step']} x batch {state['recipe']['batch_size']} |
| wall time | {state['seconds'] / 60:.1f} min on {state['device']} (as measured; other load on the machine counts) |
| hardware | {state.get('hardware') or hardware()} |

Reproduce: `obliviate zoo train {name} --exclude {' --exclude '.join(excluded)}` then
`obliviate zoo install {name} --run {run}` (this file is written by the latter).

## Evaluation ({config['forget_prompts']} prompts x {config['images_per_prompt']} images per forgotten concept, {config['retain_prompts']} retained prompts)

| model | UA | IRA | CRA | FD |
|---|---|---|---|---|
{rows}
"""
    (target / "MODEL_CARD.md").write_text(card)
    (target / "evaluation.json").write_text(json.dumps({"oracle": oracle, "base": base}, indent=2))
    return target


def install_judge(name: str, run: Path) -> Path:
    """Copy a `zoo train` judge run into the package's weights, with a card of its recipe and
    held-out render accuracy."""
    target = ZOO[name].path
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for file in ("judge.json", "judge.safetensors"):
        shutil.copy2(run / file, target / file)
    config = json.loads((run / "judge.json").read_text())
    acc = config["heldout_render_accuracy"]
    recipe = config["recipe"]
    augment = f"noise {recipe['augment_noise']}"
    if recipe.get("fade", 1.0) < 1:
        augment += f"; textures faded to as little as {recipe['fade']:.0%} contrast"
    if recipe.get("recolour"):
        augment += f"; {recipe['recolour']:.0%} of each batch hue-turned (no colour loss on those)"
    if recipe.get("blur"):
        augment += f"; Gaussian blur up to {recipe['blur']} px"
    (target / "MODEL_CARD.md").write_text(f"""# {name}

An attribute classifier of the embedded world: a small CNN (width {config['width']}) with one
head per domain; its {config['feature_dim']}-d penultimate features feed the Fréchet distance.

| | |
|---|---|
| training | {recipe['steps']} steps x batch {recipe['batch_size']} of fresh renders, AdamW one-cycle lr {recipe['learning_rate']} |
| augmentation | {augment} |
| wall time | {config['seconds'] / 60:.1f} min on {config['device']} ({hardware()}) |
| seed | {recipe['seed']} |
| held-out render accuracy (4096 renders) | shape {acc['shape']:.4f}, colour {acc['colour']:.4f}, texture {acc['texture']:.4f} |

Reproduce: `obliviate zoo train {name} --out runs/{name}` then
`obliviate zoo install {name} --run runs/{name}`.
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

Trained on {hardware()}.
"""
    (target / "MODEL_CARD.md").write_text(card)
    return target
