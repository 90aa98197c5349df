"""The evaluator run after every request: UA per forgotten target (concept names and training
synonyms in training templates, names in held-out templates, held-out synonyms, each
separately), IRA, CRA and FD on retained prompts; optionally (``relearn_checkpoints``) the
relearnability of each forgotten target, beside the retrain oracle's when one exists.

Definitions follow UnlearnCanvas, per forgotten target t in domain d:
- UA(t): share of images generated for t's prompts that the judge does not classify as t;
- IRA(t): judge accuracy in domain d on prompts of retained concepts;
- CRA(t): judge accuracy in the other domains on the same retained prompts;
- unasked(t): share of those retained images the judge sees t in, though no retained prompt names it;
reported values average over targets. FD compares judge features of the retained images with
renders of the same labels. Results are cached by model hash, so nothing is sampled twice.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import check_number
from ..models.t2i import solver_options
from ..models.zoo import DEFAULT_JUDGE
from ..world import DEFAULT_ONTOLOGY, SPLITS, Ontology, WorldPrompts, render, sample_scenes
from .metrics import Accuracy, FrechetDistance, UnlearningAccuracy
from .quality import balanced_combinations, generate_and_judge, sample_and_judge, split_prompts


# What every text-to-image evaluator returns when something is forgotten (``eval --json``, ledger
# rows, the report); a metric that a judge or model cannot measure is None
T2I_METRIC_KEYS = ("forgotten", "eval_config", "ua", "ua_min", "ua_per_target", "ua_images", "ua_interval_per_target",
                   "ira", "cra", "fd", "retained_accuracy")


@dataclass(frozen=True)
class EvalConfig:
    forget_prompts: int = field(default=8, metadata={"help": "prompts per forgotten target and split"})
    retain_prompts: int = field(default=40, metadata={"help": "prompts of retained concepts (IRA, CRA, FD)"})
    images_per_prompt: int = field(default=4, metadata={"help": "images sampled per prompt"})
    steps: int = field(default=20, metadata={"help": "sampler steps"})
    solver: str = field(default="dpm", metadata={"help": "ddim, dpm, o-belm, ddim-lml or dpm-lml (with options: dpm-lml:momentum=0.5)"})
    judge: str = field(default=DEFAULT_JUDGE, metadata={"help": "zoo name or folder of the attribute judge"})
    ua_splits: str = field(default=",".join(SPLITS), metadata={
        "help": "prompt splits UA is measured on, comma-separated (train is always included); fewer = cheaper"})
    relearn_checkpoints: str = field(default="", metadata={
        "help": "fine-tuning step counts for relearnability, comma-separated (e.g. 0,5,10,20,50); empty = not measured"})
    oracles: str = field(default="", metadata={"help": "folder of retrain oracles (besides the shipped ones)"})
    likelihood_steps: int = field(default=0, metadata={
        "help": "ODE steps of the likelihood audit (bits/dim of renders, judge-free; 25-50); 0 = not measured"})
    likelihood_images: int = field(default=8, metadata={"help": "renders per forgotten target (and retained) it scores"})
    supertypes: bool = field(default=False, metadata={
        "help": "also judge the prompts naming each forgotten concept's supertype (\"a round shape\"): the share of "
                "images showing a member of it, and the share showing a forgotten member"})
    short_prompts: bool = field(default=False, metadata={
        "help": "also measure UA (``ua_short``) on short prompts that name the target with one other attribute or "
                "none (\"a striped triangle\", \"a striped\"), the forms the training templates never take"})
    unnamed_prompts: bool = field(default=False, metadata={
        "help": "also measure, per forgotten target, the share of images showing it for retained prompts that leave "
                "its domain unnamed (``unnamed``: \"a red square\" drawn dotted once dotted is forgotten), the "
                "model's default there; a model never trained on the target draws it in none"})
    seed: int = 0

    def __post_init__(self):
        for name in ("forget_prompts", "retain_prompts", "images_per_prompt", "steps", "likelihood_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        try:
            steps = self.checkpoints
        except ValueError:
            raise ValueError(f"relearn_checkpoints must be step counts like 0,5,10,20,50, got {self.relearn_checkpoints!r}") from None
        if steps and (len(steps) < 2 or min(steps) < 0):
            raise ValueError(f"relearn_checkpoints needs at least two step counts >= 0, got {self.relearn_checkpoints!r}")
        check_number("relearn_checkpoints", steps)
        solver_options(self.solver)
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"ua_splits names {', '.join(sorted(unknown))}; choose from {', '.join(SPLITS)}.")

    @property
    def splits(self) -> tuple[str, ...]:
        named = {s.strip() for s in self.ua_splits.split(",") if s.strip()} | {"train"}
        return tuple(s for s in SPLITS if s in named) + tuple(sorted(named - set(SPLITS)))

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(sorted({int(s) for s in self.relearn_checkpoints.replace("/", ",").split(",") if s.strip()}))


def _shows_target(predicted: dict[str, torch.Tensor], group: dict[str, set[int]], ontology: Ontology) -> torch.Tensor:
    """Per image: does the judge see every concept of a target (a combination needs all)?"""
    shows = torch.ones(len(next(iter(predicted.values()))), dtype=torch.bool)
    for domain, allowed in group.items():
        shows &= torch.isin(predicted[domain], torch.tensor(sorted(allowed)))
    return shows


def _unlearning_accuracy(shows: torch.Tensor) -> UnlearningAccuracy:
    """UA over judged images of a target's prompts (``shows``: does each show it?): the share that do not."""
    metric = UnlearningAccuracy()
    metric.update(shows.long(), torch.ones_like(shows, dtype=torch.long))
    return metric


class CachedEvaluator:
    """``evaluator(model, store=None, forgotten=(...)) -> metrics``, usable directly on a model:
    ``evaluate`` runs once per (model weights, config, forgotten targets) when ``cache_dir`` is set."""

    config = None  # a config dataclass; part of the cache key
    cache_dir: Path | None = None

    def evaluate(self, model, forgotten: tuple[str, ...] = ()) -> dict:
        raise NotImplementedError

    def __call__(self, model, store=None, forgotten: tuple[str, ...] = ()) -> dict:
        key = self._cache_key(model, forgotten)
        cached = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text())
        metrics = self.evaluate(model, forgotten)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(metrics, indent=2))
        return metrics

    def _cache_key(self, model, forgotten) -> str:
        from ..hashing import tensor_hash
        identity = [tensor_hash(model.state_tensors()), asdict(self.config), sorted(forgotten)]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


class Evaluator(CachedEvaluator):
    """The embedded world's evaluator: the attribute judge over world prompts."""

    def __init__(self, judge, config: EvalConfig = EvalConfig(), ontology: Ontology = DEFAULT_ONTOLOGY,
                 cache_dir: Path | None = None):
        self.judge = judge.eval()
        self.config = config
        self.ontology = ontology
        self.prompts = WorldPrompts(ontology)
        self.cache_dir = cache_dir
        self._oracle_runs: dict = {}  # (oracle folder, target) -> its relearn result; the oracle never changes

    @classmethod
    def for_store(cls, store, config: EvalConfig = EvalConfig()) -> "Evaluator":
        from ..models.zoo import load_judge
        if store.info["kind"] != "t2i" or not isinstance(store.prompts(), WorldPrompts):
            raise ValueError("This evaluator judges the embedded world; the store holds another model. "
                             "Evaluate it with FreeTextEvaluator (`--set judge=CLIP_FOLDER`).")
        return cls(load_judge(config.judge), config, cache_dir=store.root / "cache" / "eval")

    @torch.no_grad()
    def evaluate(self, model, forgotten: tuple[str, ...] = ()) -> dict:
        cfg, onto = self.config, self.ontology
        groups = {t: self.prompts.target_groups((t,))[0] for t in dict.fromkeys(forgotten)}
        out: dict = {"forgotten": list(groups), "eval_config": asdict(cfg)}

        ua: dict[str, dict[str, float]] = {}
        ua_interval: dict[str, list[float]] = {}
        ua_images = 0
        forget_labels = self.forget_labels(tuple(groups))
        forms = cfg.splits + (("short",) if cfg.short_prompts else ())
        for target, group in groups.items():
            ua[target] = {}
            for form in forms:
                metric = _unlearning_accuracy(self._forget_images(model, forget_labels[target], group, form)[2])
                ua[target][form] = round(metric.compute(), 4)
                if form == "train":  # the split ``ua`` and ``ua_min`` are read from
                    ua_interval[target] = [round(end, 4) for end in metric.interval()]
                    ua_images = metric.total

        retained = self._retained_labels(list(groups.values()), cfg.retain_prompts)
        images, rows, predicted, features = generate_and_judge(model, self.judge, retained, "train", cfg.images_per_prompt,
                                                               cfg.seed, cfg.steps, cfg.solver, onto)
        per_domain = {}
        for i, domain in enumerate(onto.domains):
            metric = Accuracy()
            metric.update(predicted[domain], torch.from_numpy(rows[:, i]))
            per_domain[domain] = metric.compute()
        out["retained_accuracy"] = {d: round(v, 4) for d, v in per_domain.items()}

        fd = FrechetDistance(self.judge.num_features)
        scenes = sample_scenes(len(rows), cfg.seed + 1, shape=rows[:, 0], colour=rows[:, 1], texture=rows[:, 2], ontology=onto)
        device = next(self.judge.parameters()).device
        fd.update(self.judge.features(torch.from_numpy(render(scenes, onto)).to(device)).cpu(), real=True)
        fd.update(features, real=False)
        out["fd"] = round(fd.compute(), 4)

        if groups:
            target_domains = {t: {d for d in g} for t, g in groups.items()}
            ira = [np.mean([per_domain[d] for d in ds]) for ds in target_domains.values()]
            cra = [np.mean([per_domain[d] for d in onto.domains if d not in ds] or [np.nan]) for ds in target_domains.values()]
            out["ua"] = round(float(np.mean([v["train"] for v in ua.values()])), 4)
            for split in forms[1:]:
                out[f"ua_{split}"] = round(float(np.mean([v[split] for v in ua.values()])), 4)
            out["ua_min"] = round(float(min(v["train"] for v in ua.values())), 4)
            out["ua_per_target"] = ua
            # 95% intervals: a 32-image UA of 0.94 may be anything from 0.79 to 0.99, so a bar is read from them
            out["ua_images"] = ua_images
            out["ua_interval_per_target"] = ua_interval
            out["ira"] = round(float(np.mean(ira)), 4)
            out["cra"] = round(float(np.nanmean(cra)), 4) if not np.all(np.isnan(cra)) else None
            # no retained prompt asks for a forgotten target, so every retained image showing one
            # is the erased concept leaking into other prompts (an erasure that moved, not went)
            unasked = {t: round(float(_shows_target(predicted, g, onto).float().mean()), 4) for t, g in groups.items()}
            out["unasked_per_target"] = unasked
            out["unasked"] = round(float(np.mean(list(unasked.values()))), 4)
        else:
            out["ira"] = out["cra"] = round(float(np.mean(list(per_domain.values()))), 4)
        if groups and cfg.supertypes:
            out.update(self.supertype_accuracy(model, tuple(groups)))
        if groups and cfg.unnamed_prompts:
            out.update(self.unnamed_share(model, groups))
        if groups and cfg.checkpoints:
            with torch.enable_grad():  # the attack fine-tunes a copy
                out.update(self.relearnability(model, tuple(groups)))
        if groups and cfg.likelihood_steps:
            out.update(self.likelihood(model, groups, retained[:cfg.likelihood_images]))
        return out

    def forget_labels(self, forgotten: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Each target's forget-prompt label rows, drawn in order from one stream of the config's seed."""
        rng = np.random.default_rng(self.config.seed)
        return {t: self.prompts.sample_labels(self.config.forget_prompts, rng, include=[self.prompts.target_groups((t,))[0]])
                for t in dict.fromkeys(forgotten)}

    @torch.no_grad()
    def judged_as_target(self, model, forgotten: tuple[str, ...],
                         short: bool = False) -> dict[str, tuple[torch.Tensor, list[str]]]:
        """Per target, the training-template images the judge counts as still showing it (UA's
        misses, (1 - UA) x ``ua_images`` of them, drawn exactly as ``evaluate`` draws them), with
        their prompts; with ``short``, those of the short forms behind ``ua_short``. The judge must
        name a class for every image, and an erasure can draw something no class describes: these
        are the images to check its calls on by eye."""
        out = {}
        for target, labels in self.forget_labels(forgotten).items():
            group = self.prompts.target_groups((target,))[0]
            prompts, images, shows = self._forget_images(model, labels, group, "short" if short else "train")
            out[target] = (images[shows], [p for p, shown in zip(prompts, shows.tolist()) if shown])
        return out

    def _forget_images(self, model, labels: np.ndarray, group: dict[str, set[int]],
                       form: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The images of one target's forget prompts in ``form`` (a template split, or ``short`` for
        ``short_forms``): each image's prompt, the images, and whether the judge sees the target in each."""
        cfg = self.config
        prompts = self.short_forms(labels, group) if form == "short" else split_prompts(model, labels, form, self.ontology)
        images, predicted, _ = sample_and_judge(model, self.judge, prompts, cfg.images_per_prompt, cfg.seed, cfg.steps,
                                                cfg.solver, self.ontology)
        per_image = [p for p in prompts for _ in range(cfg.images_per_prompt)]  # as sample_and_judge draws them
        return per_image, images, _shows_target(predicted, group, self.ontology)

    def short_forms(self, labels: np.ndarray, group: dict[str, set[int]]) -> list[str]:
        """Per label row, the target's words with one other attribute (two rows of every three,
        taking the other domains in turn) or alone."""
        others = [d for d in self.ontology.domains if d not in group]
        return [self.prompts.short_prompt(row, set(group) | ({others[i % len(others)]} if others and i % 3 < 2 else set()))
                for i, row in enumerate(labels)]

    def supertype_accuracy(self, model, forgotten: tuple[str, ...]) -> dict:
        """Per supertype of a forgotten concept: of ``images_per_prompt`` images for each prompt
        naming it, the share the judge places among its members (``accuracy``: SuPLoRA's
        supertype retention) and among its forgotten members (``forgotten_share``: "a round
        shape" still drawing the forgotten circle; a member counts as forgotten when a request
        forgot it on its own, not as part of a combination)."""
        cfg, onto = self.config, self.ontology
        per_supertype = {}
        for supertype in self.prompts.supertype_of(forgotten).split("+"):
            members = onto.supertypes[supertype]
            domain = onto.get(members[0]).domain
            prompts = [p for p in self.prompts.supertype_prompts(supertype) for _ in range(cfg.images_per_prompt)]
            predicted = self.judge.predict(model.sample(prompts, steps=cfg.steps, seed=cfg.seed, solver=cfg.solver))[domain]

            def share(names) -> float:
                return round(float(torch.isin(predicted, torch.tensor([onto.index(n) for n in names])).float().mean()), 4)
            per_supertype[supertype] = {"accuracy": share(members), "forgotten_share": share([m for m in members if m in forgotten]),
                                        "images": len(prompts)}
        return {"supertype": per_supertype,
                "supertype_accuracy": round(float(np.mean([v["accuracy"] for v in per_supertype.values()])), 4)}

    def unnamed_share(self, model, groups: dict[str, dict[str, set[int]]]) -> dict:
        """Per forgotten target, of ``images_per_prompt`` images for each of ``forget_prompts``
        retained prompts that leave the target's domains unnamed ("a red square" once dotted is
        forgotten), the share the judge sees the target in (``unnamed_per_target``; ``unnamed``
        is the mean): what the model draws where a prompt names nothing, which an erasure on
        the target's own prompts never touches."""
        cfg, onto = self.config, self.ontology
        rows = self.prompts.sample_labels(cfg.forget_prompts, np.random.default_rng(cfg.seed + 2), exclude=list(groups.values()))
        shares = {}
        for target, group in groups.items():
            prompts = [self.prompts.short_prompt(row, set(onto.domains) - set(group)) for row in rows]
            _, predicted, _ = sample_and_judge(model, self.judge, prompts, cfg.images_per_prompt, cfg.seed, cfg.steps,
                                               cfg.solver, onto)
            shares[target] = round(float(_shows_target(predicted, group, onto).float().mean()), 4)
        return {"unnamed_per_target": shares, "unnamed": round(float(np.mean(list(shares.values()))), 4)}

    def likelihood(self, model, groups: dict[str, dict], retained: np.ndarray) -> dict:
        """Bits per dimension of renders (``likelihood.bits_per_dim``): of each forgotten target
        under the model and under the retrain oracle (forgetting should raise the model's towards
        the oracle's), and of retained renders (which should stay where they were)."""
        from ..models.t2i import T2IModel
        from ..models.zoo import find_oracle
        from .attacks.base import render_rows
        from .likelihood import bits_per_dim
        cfg = self.config

        def score(m, labels) -> float:
            texts = [self.prompts.prompt(row, self.prompts.templates[0]) for row in labels]
            return round(float(bits_per_dim(m, render_rows(self.prompts, labels, cfg.seed + 2), texts,
                                            cfg.likelihood_steps, cfg.seed).mean()), 4)

        per_target = {}
        for target, group in groups.items():
            rng = np.random.default_rng([cfg.seed, zlib.crc32(target.encode())])  # the same renders in every call
            labels = self.prompts.sample_labels(cfg.likelihood_images, rng, include=[group])
            entry = {"bits_per_dim": score(model, labels)}
            folder = find_oracle(tuple(groups), model.language, cfg.oracles or None) or find_oracle(
                (target,), model.language, cfg.oracles or None)
            if folder is not None:
                if (folder, target, "nll") not in self._oracle_runs:
                    self._oracle_runs[folder, target, "nll"] = score(T2IModel.load(folder).eval(), labels)
                entry["oracle_bits_per_dim"] = self._oracle_runs[folder, target, "nll"]
            per_target[target] = entry
        gaps = [e["bits_per_dim"] - e["oracle_bits_per_dim"] for e in per_target.values() if "oracle_bits_per_dim" in e]
        return {"nll": per_target, "nll_forgotten": round(float(np.mean([e["bits_per_dim"] for e in per_target.values()])), 4),
                "nll_forgotten_gap": round(float(np.mean(gaps)), 4) if len(gaps) == len(per_target) else None,
                "nll_retained": score(model, retained)}

    def relearnability(self, model, forgotten: tuple[str, ...]) -> dict:
        """Per forgotten target, the relearning attack's curve and its area (``curve_auc``), and
        the same for the retrain oracle that never saw it (one for everything forgotten, else for
        the target alone) with the gap between the two; means over targets beside them."""
        from ..models.t2i import T2IModel
        from ..models.zoo import find_oracle
        from .attacks.relearn import RelearnAttack, RelearnConfig
        cfg = self.config
        attack = RelearnAttack(RelearnConfig(prompts=cfg.forget_prompts, images_per_prompt=cfg.images_per_prompt,
                                             sampling_steps=cfg.steps, checkpoints=cfg.checkpoints))
        per_target = {}
        for target in forgotten:
            result = attack.run(model, target, self.judge, self.prompts, seed=cfg.seed)
            entry = {"auc": round(result.auc, 4), "curve": [list(p) for p in result.curve]}
            folder = (find_oracle(forgotten, model.language, cfg.oracles or None)
                      or find_oracle((target,), model.language, cfg.oracles or None))
            if folder is not None:
                if (folder, target) not in self._oracle_runs:
                    self._oracle_runs[folder, target] = attack.run(T2IModel.load(folder).eval(), target, self.judge,
                                                                   self.prompts, seed=cfg.seed)
                oracle = self._oracle_runs[folder, target]
                entry.update(oracle_auc=round(oracle.auc, 4), gap=round(result.auc - oracle.auc, 4),
                             oracle_curve=[list(p) for p in oracle.curve], oracle=folder.parent.name)
            per_target[target] = entry
        gaps = [e["gap"] for e in per_target.values() if "gap" in e]
        return {"relearn": per_target, "relearn_auc": round(float(np.mean([e["auc"] for e in per_target.values()])), 4),
                "relearn_auc_gap": round(float(np.mean(gaps)), 4) if len(gaps) == len(per_target) else None}

    def _retained_labels(self, groups: list[dict[str, set[int]]], n: int) -> np.ndarray:
        """Balanced label rows, skipping any that show a forgotten target."""
        onto = self.ontology
        candidates = balanced_combinations(n * 4 + 360, onto)
        keep = [row for row in candidates
                if not any(all(row[onto.domains.index(d)] in a for d, a in g.items()) for g in groups)]
        if not keep:
            raise ValueError("Every concept combination shows a forgotten target; nothing retained to evaluate.")
        return np.array(keep[:n])
