"""Evaluation of a classifier after each request, against the retrain oracle.

- UA: 1 - accuracy on the forget set (training data forgotten so far); ``ua_test`` the same on
  test images of forgotten classes (class deletion only).
- RA / TA: accuracy on retained training data / on test images of classes still known.
- MIA: membership-inference efficacy on the forget set, after SalUn's ``SVC_MIA``: an attack
  learns to tell retained training examples (members) from test examples (non-members) by the
  model's confidence in the true label; MIA is the share of forget examples it calls
  non-members (higher = more forgotten). The attack is a logistic regression rather than
  SalUn's RBF SVM: forgotten examples have confidences the attack never saw in training, and
  an RBF SVM's call there is arbitrary (it flipped whole sequences from 1 to 0 in our runs),
  while a monotone attack calls low confidence "non-member". Its slope is constrained to be
  non-negative: where members are no more confident than non-members (a collapsed or fully
  distilled model), the constrained fit is the constant 1/2, a coin flip, and MIA reads 0.5 rather
  than the 0 an inverted attack would give.
- Relearn: optimizer steps on the forget set until its accuracy is back to ``relearn_accuracy``
  (SGD at 0.01 with momentum by default; ``relearn_optimizer`` and ``relearn_learning_rate`` vary the attacker).
- Probe: a linear probe trained on penultimate features of all training data (forgotten classes
  included) and tested on forgotten classes' test images: the information features still hold.
- Gap: mean absolute difference to the retrain oracle over UA, RA, TA and MIA, in points, the
  number the classification unlearning literature reports.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from ..training import OPTIMIZERS
from .metrics import Accuracy

GAP_KEYS = ("ua", "ra", "ta", "mia")


@dataclass(frozen=True)
class ClassifierEvalConfig:
    oracle: bool = field(default=True, metadata={"help": "retrain without the forgotten data and report the gap to it"})
    relearn: bool = field(default=True, metadata={"help": "measure relearn steps"})
    relearn_accuracy: float = field(default=0.9, metadata={"help": "forget-set accuracy that counts as relearned"})
    relearn_max_steps: int = field(default=100, metadata={"help": "give up relearning after this many steps"})
    relearn_optimizer: Literal["sgd", "adam"] = field(default="sgd", metadata={
        "help": "the relearning attacker's optimizer (sgd with momentum 0.9, or adam)"})
    relearn_learning_rate: float = field(default=0.01, metadata={"help": "the relearning attacker's learning rate"})
    probe: bool = field(default=True, metadata={"help": "linear probe on penultimate features"})
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.relearn_accuracy <= 1 or self.relearn_max_steps <= 0:
            raise ValueError("relearn_accuracy must lie in (0, 1] and relearn_max_steps be positive")
        if self.relearn_optimizer not in OPTIMIZERS or self.relearn_learning_rate <= 0:
            raise ValueError(f"relearn_optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.relearn_optimizer!r}) "
                             f"and relearn_learning_rate positive (got {self.relearn_learning_rate})")


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(y) == 0:
        return None
    metric = Accuracy()
    metric.update(model.predict(x), y)
    return metric.compute()


@torch.no_grad()
def true_label_confidence(model, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.net.eval()
    probabilities = F.softmax(model.net(x.to(model.device)), dim=1).cpu()
    return probabilities[torch.arange(len(y)), y].numpy()


def mia_efficacy(model, members: tuple, non_members: tuple, forget: tuple, seed: int = 0) -> float:
    """Share of forget examples a confidence-based membership attack calls non-members."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(seed)
    member_conf = true_label_confidence(model, *members)
    other_conf = true_label_confidence(model, *non_members)
    n = min(len(member_conf), len(other_conf))
    features = np.concatenate([rng.choice(member_conf, n, replace=False), rng.choice(other_conf, n, replace=False)])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    attack = LogisticRegression(C=100.0).fit(features[:, None], labels)
    if attack.coef_[0, 0] <= 0:
        # The best fit with a non-negative slope on balanced classes is slope 0, probability 1/2
        # everywhere: every call is a tie, counted as half.
        return 0.5
    return float(1.0 - attack.predict(true_label_confidence(model, *forget)[:, None]).mean())


def relearn_steps(model, x: torch.Tensor, y: torch.Tensor, target_accuracy: float, max_steps: int,
                  learning_rate: float = 0.01, batch_size: int = 32, seed: int = 0, optimizer: str = "sgd") -> int:
    """Optimizer steps on (x, y) until its accuracy reaches ``target_accuracy`` (``max_steps`` if never)."""
    student = copy.deepcopy(model)
    options = {"momentum": 0.9} if optimizer == "sgd" else {}
    attacker = OPTIMIZERS[optimizer](student.net.parameters(), lr=learning_rate, **options)
    generator = torch.Generator().manual_seed(seed)
    for step in range(max_steps):
        if accuracy(student, x, y) >= target_accuracy:
            return step
        index = torch.randint(0, len(x), (batch_size,), generator=generator)
        student.net.train()
        loss = F.cross_entropy(student.net(x[index].to(student.device)), y[index].to(student.device))
        attacker.zero_grad()
        loss.backward()
        attacker.step()
    return max_steps


@torch.no_grad()
def probe_accuracy(model, train: tuple, test: tuple, seed: int = 0) -> float | None:
    """Accuracy of a linear probe on penultimate features over ``test`` (forgotten classes)."""
    from sklearn.linear_model import LogisticRegression
    if len(test[1]) == 0:
        return None
    model.net.eval()
    features = lambda x: model.net.features(x.to(model.device)).cpu().numpy()  # noqa: E731
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(features(train[0]), train[1].numpy())
    return float((probe.predict(features(test[0])) == test[1].numpy()).mean())


@functools.lru_cache(maxsize=16)
def _train_oracle(recipe_json: str, forgotten: tuple[str, ...]):
    from ..classifiers.train import ClassifierRecipe, train_classifier
    recipe = {k: v for k, v in json.loads(recipe_json).items() if k != "train_seconds"}
    start = time.time()
    model = train_classifier(ClassifierRecipe(**recipe), exclude=forgotten)
    return model, time.time() - start


def retrain_oracle(model, forgotten: tuple[str, ...], cache_dir: Path | None = None):
    """The model's recipe rerun without ``forgotten``: (model, seconds). Cached per process
    and, with ``cache_dir``, on disk by recipe and forgotten set (training is seeded, so a cached
    oracle is the one a rerun would give)."""
    from ..classifiers.models import ClassifierModel
    if not model.recipe:
        raise ValueError("This classifier carries no training recipe, so its retrain oracle cannot be built; "
                         "evaluate with oracle=false.")
    recipe_json, key = json.dumps(model.recipe, sort_keys=True), tuple(sorted(forgotten))
    folder = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([recipe_json, key]).encode()).hexdigest()[:20]
        folder = Path(cache_dir) / digest
        if (folder / "seconds.json").is_file():
            return ClassifierModel.load(folder), json.loads((folder / "seconds.json").read_text())["seconds"]
    oracle, seconds = _train_oracle(recipe_json, key)
    if folder is not None:
        oracle.save(folder)
        (folder / "seconds.json").write_text(json.dumps({"seconds": seconds, "forgotten": list(key)}))
    return oracle, seconds


class ClassifierEvaluator:
    """``evaluator(model, store=None, forgotten=(...)) -> metrics`` for classifier stores."""

    def __init__(self, config: ClassifierEvalConfig = ClassifierEvalConfig(), cache_dir: Path | None = None):
        self.config = config
        self.cache_dir = cache_dir  # where retrain oracles are kept between runs

    def __call__(self, model, store=None, forgotten: tuple[str, ...] = ()) -> dict:
        from ..classifiers.targets import DataTargets
        targets = DataTargets(model.dataset)
        split = targets.split(tuple(forgotten))
        out = {"forgotten": list(forgotten), "eval_config": asdict(self.config), **self.measure(model, split)}
        if self.config.oracle and forgotten:
            oracle, seconds = retrain_oracle(model, tuple(forgotten), self.cache_dir)
            reference = self.measure(oracle, split)
            out["oracle"] = {**reference, "retrain_seconds": round(seconds, 3)}
            out["gap"] = round(float(np.mean([abs(out[k] - reference[k]) for k in GAP_KEYS])) * 100, 3)
        return out

    def measure(self, model, split) -> dict:
        cfg = self.config
        model.eval()
        out = {"ra": accuracy(model, split.retain_x, split.retain_y), "ta": accuracy(model, split.test_x, split.test_y)}
        if len(split.forget_y):
            out["ua"] = 1.0 - accuracy(model, split.forget_x, split.forget_y)
            forgotten_test = accuracy(model, split.forget_test_x, split.forget_test_y)
            out["ua_test"] = None if forgotten_test is None else 1.0 - forgotten_test
            out["mia"] = mia_efficacy(model, (split.retain_x, split.retain_y), (split.test_x, split.test_y),
                                      (split.forget_x, split.forget_y), cfg.seed)
            if cfg.relearn:
                out["relearn_steps"] = relearn_steps(model, split.forget_x, split.forget_y, cfg.relearn_accuracy,
                                                     cfg.relearn_max_steps, cfg.relearn_learning_rate, seed=cfg.seed,
                                                     optimizer=cfg.relearn_optimizer)
            if cfg.probe:
                all_x = torch.cat([split.retain_x, split.forget_x])
                all_y = torch.cat([split.retain_y, split.forget_y])
                out["probe"] = probe_accuracy(model, (all_x, all_y), (split.forget_test_x, split.forget_test_y), cfg.seed)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
