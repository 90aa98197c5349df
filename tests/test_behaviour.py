"""Behaviour on the shipped model: each text-to-image method's best recipe forgets striped and
keeps the rest of its domain. Slow (minutes): run with `make check-slow`."""

import pytest

from obliviate.engine import RegularizerSpec, Store
from obliviate.evaluation.evaluator import EvalConfig, Evaluator

GRADPROJ = (RegularizerSpec("gradproj"),)
# method -> (options, regularizers, UA at least, IRA at most this far below the base model's)
# UA >= 0.9 with IRA within 5 points, except where the method's documented figure (README,
# benchmarks/s1.md) is weaker: it is stated here, so a regression below it fails.
RECIPES = {
    "esd": ({"guide": "anchor", "trainable": "xattn-kv"}, GRADPROJ, 0.9, 0.05),
    "ablation": ({"trainable": "xattn-kv"}, GRADPROJ, 0.9, 0.05),
    "fdiv": ({"trainable": "xattn-kv"}, GRADPROJ, 0.9, 0.05),
    "sfron": ({"trainable": "xattn-kv"}, GRADPROJ, 0.9, 0.05),
    # SalUn's random relabelling trades retention for forgetting here. Since each anchor is its own
    # prompt with the target swapped (not another pair's), it measures UA 1.0 with IRA 0.78-0.95
    # over seeds 0-2 (0.56-0.78 and 0.71-0.74 before).
    "salun": ({}, (), 0.9, 0.25),
    "uce": ({}, (), 0.9, 0.05),
    "erasepro": ({}, (), 0.9, 0.05),
    "sdwv": ({}, (), 0.9, 0.05),
    # the naive baseline: it barely forgets before it diverges (s1: UA 0.16; 0.06 since its prompts
    # cover every word of the target, #15, measured here and at b9e8388)
    "ga": ({}, (), 0.05, 0.05),
}
EVAL = EvalConfig(forget_prompts=16, images_per_prompt=2, ua_splits="train")


@pytest.fixture(scope="module")
def base_ira(tmp_path_factory):
    store = Store.init(tmp_path_factory.mktemp("base") / "s", "shapes-t2i")
    return Evaluator.for_store(store, EVAL)(store.load_model(), store, forgotten=("striped",))["ira"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_best_recipe_forgets_striped_and_keeps_its_domain(tmp_path, method, base_ira):
    options, regularizers, min_ua, max_ira_drop = RECIPES[method]
    store = Store.init(tmp_path / "s", "shapes-t2i")
    store.add_request(["striped"], method, options, regularizers=regularizers)
    outcome, = store.apply(evaluator=Evaluator.for_store(store, EVAL))
    metrics = outcome.metrics
    assert metrics["ua"] >= min_ua, metrics
    assert metrics["ira"] >= base_ira - max_ira_drop, (metrics, base_ira)


# On shapes-t2i-v2, the default model: concept ablation on to_k/to_v with gradproj is the recipe of
# benchmarks/depth (gradproj's target_rank keeps striped's own directions movable), alone and
# under each defence against relearning and prompt attacks.
V2_EVAL = EvalConfig(forget_prompts=8, images_per_prompt=2, retain_prompts=24, ua_splits="train")


@pytest.fixture(scope="module")
def base_ira_v2(tmp_path_factory):
    store = Store.init(tmp_path_factory.mktemp("base-v2") / "s", "shapes-t2i-v2")
    return Evaluator.for_store(store, V2_EVAL)(store.load_model(), store, forgotten=("striped",))["ira"]


@pytest.mark.slow
@pytest.mark.parametrize("defence", ["none", "meta", "adversarial"])
def test_v2_recipe_forgets_striped_and_keeps_its_domain_under_each_defence(tmp_path, defence, base_ira_v2):
    regularizers = GRADPROJ + (() if defence == "none" else (RegularizerSpec(defence),))
    store = Store.init(tmp_path / "s", "shapes-t2i-v2")
    store.add_request(["striped"], "ablation", {"trainable": "xattn-kv"}, regularizers=regularizers)
    outcome, = store.apply(evaluator=Evaluator.for_store(store, V2_EVAL))
    assert outcome.metrics["ua"] >= 0.9, outcome.metrics
    assert outcome.metrics["ira"] >= base_ira_v2 - 0.05, (outcome.metrics, base_ira_v2)
