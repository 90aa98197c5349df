"""Metrics, evaluators and attacks. ``evaluator_for`` picks the evaluator of a store: the
attribute judge's for the embedded world, a CLIP (or user) judge's for other text-to-image
models, the oracle-gap one for classifiers."""

from __future__ import annotations


def evaluator_for(store, options: dict | None = None):
    """The evaluator `apply` and `eval` use for ``store``; ``options`` are its config fields."""
    from ..config import build_config
    from ..world.targets import FreeTextPrompts
    from .classifier import ClassifierEvalConfig, ClassifierEvaluator
    from .evaluator import EvalConfig, Evaluator
    from .free_text import FreeTextEvalConfig, FreeTextEvaluator
    if store.info["kind"] == "classifier":
        return ClassifierEvaluator(build_config(ClassifierEvalConfig, options, owner="classifier evaluation"),
                                   cache_dir=store.root / "cache" / "oracles")
    if isinstance(store.prompts(), FreeTextPrompts):
        return FreeTextEvaluator.for_store(store, build_config(FreeTextEvalConfig, options, owner="evaluation"))
    return Evaluator.for_store(store, build_config(EvalConfig, options, owner="evaluation"))
