"""Metrics, evaluators and attacks. ``evaluator_for`` picks the evaluator of a store's model
family: the judge-based one for text-to-image stores, the oracle-gap one for classifiers."""

from __future__ import annotations


def evaluator_for(store, options: dict | None = None):
    """The evaluator `apply` and `eval` use for ``store``; ``options`` are its config fields."""
    from ..config import build_config
    from .classifier import ClassifierEvalConfig, ClassifierEvaluator
    from .evaluator import EvalConfig, Evaluator
    if store.info["kind"] == "classifier":
        return ClassifierEvaluator(build_config(ClassifierEvalConfig, options, owner="classifier evaluation"),
                                   cache_dir=store.root / "cache" / "oracles")
    return Evaluator.for_store(store, build_config(EvalConfig, options, owner="evaluation"))
