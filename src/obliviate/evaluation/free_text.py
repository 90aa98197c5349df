"""The evaluator of a text-to-image store outside the embedded world (Stable Diffusion): the same
metric keys as the world's evaluator, judged by a ``ConceptJudge`` (a CLIP model folder, or a
user's own classifier) over the store's concept list.

Per forgotten target t, with the judge choosing among every concept of the evaluation (forgotten
targets, retained concepts, ``concepts`` and ``neutral``):
- UA(t): share of images drawn for prompts of t that the judge does not see as t;
- IRA: share of images drawn for prompts of a retained concept that the judge sees as that
  concept (``retained_accuracy`` per concept). Free text has no domains, so CRA is None;
- FD: Fréchet distance of judge features of the retained images to those the store's base model
  draws from the same prompts and noise (0 for the base model itself);
- CLIP score (contrastive judges): ``100 * max(cos(image, prompt), 0)`` on retained prompts
  (``clip_score``; should stay) and on forgotten ones (``clip_score_forgotten``; should fall).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..models.t2i import solver_options
from ..world.targets import FreeTextPrompts
from .concept_judge import CLIPJudge, ConceptJudge, ContrastiveJudge
from .evaluator import CachedEvaluator
from .metrics import Accuracy, CLIPScore, FrechetDistance, UnlearningAccuracy


@dataclass(frozen=True)
class FreeTextEvalConfig:
    judge: str = field(default="", metadata={
        "help": "folder of a CLIP model (transformers CLIPModel.save_pretrained: config, weights, tokenizer); a path, never a hub id"})
    retain: tuple[str, ...] = field(default=(), metadata={
        "help": "retained concepts to measure, comma-separated; default: the store's --retain list"})
    concepts: tuple[str, ...] = field(default=(), metadata={
        "help": "further concepts the judge may see in an image, comma-separated (besides forgotten and retained ones)"})
    neutral: str = field(default="something else", metadata={
        "help": "a catch-all concept for images that show none of the others; empty = none"})
    label_template: str = field(default="a photo of {}", metadata={"help": "the text the judge compares an image with, per concept"})
    forget_prompts: int = field(default=8, metadata={"help": "prompts per forgotten target"})
    retain_prompts: int = field(default=40, metadata={"help": "prompts of retained concepts (IRA, FD, CLIP score)"})
    images_per_prompt: int = field(default=4, metadata={"help": "images sampled per prompt"})
    steps: int = field(default=20, metadata={"help": "sampler steps"})
    solver: str = field(default="dpm", metadata={"help": "ddim, dpm, o-belm, ddim-lml or dpm-lml (with options: dpm-lml:momentum=0.5)"})
    seed: int = 0

    def __post_init__(self):
        if not self.judge:
            raise ValueError("Evaluating a Stable Diffusion store needs a judge: pass --set judge=FOLDER (at init: "
                             "--eval-set judge=FOLDER), a local folder holding a CLIP model saved by transformers.")
        for name in ("forget_prompts", "retain_prompts", "images_per_prompt", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.label_template.count("{}") != 1:
            raise ValueError(f"label_template must hold one {{}} where the concept goes, got {self.label_template!r}.")
        solver_options(self.solver)


class FreeTextEvaluator(CachedEvaluator):
    """``evaluator(model, store=None, forgotten=(...)) -> metrics`` for free-text models.
    ``reference`` returns the model FD compares with (the store's base model); without it, FD
    is None."""

    def __init__(self, judge: ConceptJudge, config: FreeTextEvalConfig, retain: tuple[str, ...] = (),
                 reference: Callable[[], object] | None = None, cache_dir=None):
        if not isinstance(judge, ConceptJudge):
            raise TypeError(f"The judge must implement ConceptJudge (scores(images, concepts) and features(images)); "
                            f"got {type(judge).__name__}.")
        self.judge = judge
        self.config = config
        self.retain = tuple(config.retain or retain)
        self.reference = reference
        self.cache_dir = cache_dir
        self._reference_features: dict[tuple, torch.Tensor] = {}  # prompts -> features; the base model never changes

    @classmethod
    def for_store(cls, store, config: FreeTextEvalConfig) -> "FreeTextEvaluator":
        return cls(CLIPJudge.from_folder(config.judge, config.label_template), config,
                   retain=tuple(store.info.get("retain", ())), reference=store.base_model,
                   cache_dir=store.root / "cache" / "eval")

    def concepts(self, forgotten: tuple[str, ...]) -> list[str]:
        """What the judge chooses among, each once, in a fixed order."""
        named = [*forgotten, *self.retain, *self.config.concepts, *([self.config.neutral] if self.config.neutral else [])]
        return list(dict.fromkeys(named))

    def _draw(self, model, concept_prompts: list[tuple[str, str]]):
        """Images for (concept, prompt) pairs, ``images_per_prompt`` each; returns the images and
        the concept and prompt of each image."""
        cfg = self.config
        repeated = [pair for pair in concept_prompts for _ in range(cfg.images_per_prompt)]
        images = model.sample([p for _, p in repeated], steps=cfg.steps, seed=cfg.seed, solver=cfg.solver)
        return images, [c for c, _ in repeated], [p for _, p in repeated]

    @torch.no_grad()
    def evaluate(self, model, forgotten: tuple[str, ...] = ()) -> dict:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        forgotten = tuple(dict.fromkeys(forgotten))
        concepts = self.concepts(forgotten)
        out: dict = {"forgotten": list(forgotten), "eval_config": asdict(cfg), "concepts": concepts}
        contrastive = isinstance(self.judge, ContrastiveJudge)

        ua, forgotten_score = {}, CLIPScore()
        ua_interval, ua_images = {}, 0
        for target in forgotten:
            images, _, prompts = self._draw(model, [(target, p) for p in _prompts(target, cfg.forget_prompts, rng)])
            seen = self.judge.scores(images, concepts).argmax(-1)
            metric = UnlearningAccuracy()
            metric.update(seen, torch.full_like(seen, concepts.index(target)))
            ua[target] = {"prompts": round(metric.compute(), 4)}
            ua_interval[target], ua_images = [round(end, 4) for end in metric.interval()], metric.total
            if contrastive:
                forgotten_score.update(self.judge.image_embeddings(images), self.judge.text_embeddings(prompts))
        if ua:
            out["ua"] = round(float(np.mean([v["prompts"] for v in ua.values()])), 4)
            out["ua_min"] = round(float(min(v["prompts"] for v in ua.values())), 4)
            out["ua_per_target"] = ua
            out.update(ua_images=ua_images, ua_interval_per_target=ua_interval)  # 95%, as the world evaluator's

        kept = [c for c in self.retain if c not in forgotten]
        out.update(ira=None, cra=None, fd=None, retained_accuracy={})
        if kept:
            pairs = [(c, p) for c in kept for p in _prompts(c, -(-cfg.retain_prompts // len(kept)), rng)]
            images, shown, prompts = self._draw(model, pairs)
            seen = self.judge.scores(images, concepts).argmax(-1)
            truth = torch.tensor([concepts.index(c) for c in shown])
            total, per_concept = Accuracy(), {}
            total.update(seen, truth)
            for c in kept:
                mine = torch.tensor([s == c for s in shown])
                per_concept[c] = Accuracy()
                per_concept[c].update(seen[mine], truth[mine])
            out["ira"] = round(total.compute(), 4)
            out["retained_accuracy"] = {c: round(m.compute(), 4) for c, m in per_concept.items()}
            features = self.judge.features(images)
            if self.reference is not None and len(features) >= 2:
                fd = FrechetDistance(features.shape[1])
                fd.update(self._reference(tuple(p for _, p in pairs)), real=True)
                fd.update(features, real=False)
                out["fd"] = round(fd.compute(), 4)
            if contrastive:
                score = CLIPScore()
                score.update(self.judge.image_embeddings(images), self.judge.text_embeddings(prompts))
                out["clip_score"] = round(score.compute(), 4)
        if contrastive and ua:
            out["clip_score_forgotten"] = round(forgotten_score.compute(), 4)
        return out

    def _reference(self, prompts: tuple[str, ...]) -> torch.Tensor:
        """Judge features of what the reference model draws for ``prompts`` (same noise)."""
        if prompts not in self._reference_features:
            images, _, _ = self._draw(self.reference(), [("", p) for p in prompts])
            self._reference_features[prompts] = self.judge.features(images)
        return self._reference_features[prompts]


def _prompts(concept: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts of ``concept`` in random free-text templates, as requests draw them."""
    return [pair.target for pair in FreeTextPrompts().forget_pairs((concept,), None, n, rng)]
