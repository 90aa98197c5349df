"""Reproducible training of the embedded text-to-image model on the concept world.

Checkpoints are safetensors (model, EMA and optimizer state) plus a JSON step counter, written
atomically, so a killed run resumes where it stopped and gives the same weights as an unbroken
run with the same seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ..environment import hardware
from ..progress import progress_bar
from ..world import DEFAULT_ONTOLOGY, Language, Ontology, language, render, sample_scenes, training_prompts
from .t2i import T2IModel
from .text import MiniLMEncoder, TextEncoding
from ..seeding import seeded_by_recipe


def embedded_unet_config() -> dict:
    """~2.7M parameters: ResNets at 32x32 and 16x16, cross-attention at 8x8 and in the middle,
    where global attributes (shape, colour, texture) are decided."""
    return dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16)


def embedded_scheduler() -> DDPMScheduler:
    # v-prediction with a cosine schedule: learns flat backgrounds and colours quickly.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False)


@dataclass
class T2IRecipe:
    """How the embedded model is trained. ``language`` names the templates and words of its
    prompts (``world.LANGUAGES``); ``exclude`` drops every scene showing one of these concepts,
    which is how the retrain oracle is made. The defaults are shapes-t2i v2's recipe;
    ``V1_RECIPE`` is v1's."""

    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    prompt_dropout: float = 0.1
    prompts_per_combination: int = 32
    language: str = "v2"
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    guidance_scale: float = 2.0
    exclude: tuple[str, ...] = ()
    unet: dict = field(default_factory=embedded_unet_config)

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got steps={self.steps}, batch_size={self.batch_size}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        language(self.language)


V1_RECIPE = T2IRecipe(prompts_per_combination=8, language="v1")
# zoo name -> recipe; `zoo train NAME --exclude ...` reruns it without some concepts (an oracle)
T2I_RECIPES: dict[str, T2IRecipe] = {"shapes-t2i": V1_RECIPE, "shapes-t2i-v2": T2IRecipe()}


class PromptPool:
    """A fixed, seeded set of training prompts per (shape, colour, texture) combination, encoded
    once, so the text encoder costs nothing per step."""

    def __init__(self, encoder: MiniLMEncoder, per_combination: int, seed: int, ontology: Ontology, lang: Language):
        counts = [len(ontology.in_domain(d)) for d in ontology.domains]
        self.counts = counts
        combos = np.array(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij")).reshape(3, -1).T
        rng = np.random.default_rng(seed)
        prompts = [training_prompts(np.repeat(combos[i:i + 1], per_combination, 0), rng, ontology, lang) for i in range(len(combos))]
        flat = [p for group in prompts for p in group]
        # Kept on the CPU beside the sampled labels; each batch moves to the model's device.
        self.encoding = encoder.encode(flat).to("cpu")
        self.null = encoder.encode([""]).to("cpu")
        self.per_combination = per_combination

    def draw(self, labels: np.ndarray, rng: np.random.Generator, dropout: float) -> TextEncoding:
        combo = (labels[:, 0] * self.counts[1] + labels[:, 1]) * self.counts[2] + labels[:, 2]
        index = torch.as_tensor(combo * self.per_combination + rng.integers(0, self.per_combination, len(labels)))
        encoding = self.encoding[index]
        drop = torch.as_tensor(rng.random(len(labels)) < dropout)
        states = torch.where(drop[:, None, None], self.null.states, encoding.states)
        mask = torch.where(drop[:, None], self.null.mask, encoding.mask)
        return TextEncoding(states, mask)


def _allowed_labels(n: int, rng_seed: int, exclude: tuple[str, ...], ontology: Ontology) -> np.ndarray | None:
    """Labels for n scenes that avoid every excluded concept (None when nothing is excluded)."""
    if not exclude:
        return None
    banned = {(ontology.get(w).domain, ontology.index(w)) for w in exclude}
    rng = np.random.default_rng(rng_seed)
    counts = [len(ontology.in_domain(d)) for d in ontology.domains]
    columns = []
    for d, count in zip(ontology.domains, counts):
        allowed = [i for i in range(count) if (d, i) not in banned]
        if not allowed:
            raise ValueError(f"Excluding {exclude} removes every concept of domain {d!r}; nothing left to train on.")
        columns.append(rng.choice(allowed, size=n))
    return np.stack(columns, 1)


def _lr_factor(step: int, recipe: T2IRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)


@seeded_by_recipe
def train_t2i(recipe: T2IRecipe, out: str | Path, device: str | torch.device | None = None,
              ontology: Ontology = DEFAULT_ONTOLOGY, log=print) -> T2IModel:
    """Train (or resume) the embedded model into ``out``; returns the model with EMA weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    machine = hardware(device)
    encoder = MiniLMEncoder.from_package()
    model = T2IModel(UNet2DConditionModel(**recipe.unet), embedded_scheduler(), encoder,
                     guidance_scale=recipe.guidance_scale, language=recipe.language).to(device)
    ema = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=recipe.learning_rate, weight_decay=0.01)

    state_file, ckpt_file = out / "train_state.json", out / "checkpoint.safetensors"
    start = 0
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        if saved["recipe"] != json.loads(json.dumps(asdict(recipe))):
            raise ValueError(f"{out} holds a run with a different recipe; use another --out or delete it to start over.")
        tensors = load_file(ckpt_file)
        model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        _load_optimizer(optimizer, tensors, model.unet, saved["optimizer_steps"])
        start = saved["step"]
        log(f"resuming {out} at step {start}")

    pool = PromptPool(encoder, recipe.prompts_per_combination, recipe.seed, ontology, language(recipe.language))
    t0, elapsed_before = time.time(), (json.loads(state_file.read_text())["seconds"] if start else 0.0)
    model.unet.train()
    with progress_bar("training shapes-t2i", total=recipe.steps, completed=start) as advance:
        for step in range(start, recipe.steps):
            rng = np.random.default_rng([recipe.seed, step])
            labels = _allowed_labels(recipe.batch_size, rng.integers(2**31), recipe.exclude, ontology)
            scenes = sample_scenes(recipe.batch_size, seed=int(rng.integers(2**31)),
                                   **({} if labels is None else dict(shape=labels[:, 0], colour=labels[:, 1], texture=labels[:, 2])),
                                   ontology=ontology)
            images = torch.from_numpy(render(scenes, ontology))
            encoding = pool.draw(scenes.labels, rng, recipe.prompt_dropout).to(device)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            for group in optimizer.param_groups:
                group["lr"] = recipe.learning_rate * _lr_factor(step, recipe)
            loss = model.denoising_loss(model.to_latents(images), encoding, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
            optimizer.step()
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.unet.state_dict().items():
                    ema[k].mul_(decay).add_(v, alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
            advance(1, loss=round(loss.item(), 4))
            done = step + 1
            if done % recipe.checkpoint_every == 0 or done == recipe.steps:
                tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
                tensors.update({f"ema.{k}": v for k, v in ema.items()})
                tensors.update(_optimizer_tensors(optimizer, model.unet))
                _atomic_save(tensors, ckpt_file)
                seconds = elapsed_before + time.time() - t0
                tmp = state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": done, "seconds": seconds, "loss": float(loss.detach()),
                                           "optimizer_steps": done, "device": str(device),
                                           "hardware": machine,
                                           "recipe": asdict(recipe)}, indent=2))
                tmp.replace(state_file)
    model.unet.load_state_dict(ema)
    model.unet.eval()
    model.save(out / "model")
    return model


def _optimizer_tensors(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, param in module.named_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"opt.{key}.{name}"] = state[key]
    return tensors


def _load_optimizer(optimizer, tensors, module, steps: int) -> None:
    for name, param in module.named_parameters():
        if f"opt.exp_avg.{name}" in tensors:
            optimizer.state[param] = {"step": torch.tensor(float(steps)),
                                      "exp_avg": tensors[f"opt.exp_avg.{name}"].to(param.device),
                                      "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"].to(param.device)}
