"""The evaluator against models whose drawings are known exactly: a "model" that renders what
each prompt says, and one that never learned "striped" (draws solid instead)."""

import numpy as np
import pytest
import torch

from obliviate.evaluation.evaluator import T2I_METRIC_KEYS, EvalConfig, Evaluator
from obliviate.models.zoo import load_judge
from obliviate.world import DEFAULT_ONTOLOGY, render, sample_scenes

CONFIG = EvalConfig(forget_prompts=4, retain_prompts=20, images_per_prompt=4)


class RenderingModel:
    """Draws exactly the concepts its prompt names (by any of their words), optionally swapping
    some; ``erased_words`` are drawn as the first concept of their domain instead, as by a model
    whose erasure cut those words only."""

    guidance_scale = 0.0
    language = "v2"

    def __init__(self, swap: dict[str, str] | None = None, erased_words: tuple[str, ...] = ()):
        self.swap = swap or {}
        self.erased_words = erased_words

    def state_tensors(self):
        return {"swap": torch.tensor([len(self.swap)])}

    def sample(self, prompts, steps=0, seed=0, solver="", **_):
        onto = DEFAULT_ONTOLOGY
        rows = []
        for prompt in prompts:
            row = []
            for domain in onto.domains:
                said = [(c, w) for c in onto.in_domain(domain) for w in c.words
                        if f" {w} " in f" {prompt.replace(',', ' ').replace(':', ' ')} " or f" {w}s " in f" {prompt} "]
                concept, word = max(said, key=lambda pair: len(pair[1]))  # "hollow circle" is a ring
                name = onto.names(domain)[0] if word in self.erased_words else self.swap.get(concept.name, concept.name)
                row.append(onto.index(name))
            rows.append(row)
        rows = np.array(rows)
        scenes = sample_scenes(len(rows), seed, shape=rows[:, 0], colour=rows[:, 1], texture=rows[:, 2])
        return torch.from_numpy(render(scenes))


@pytest.fixture(scope="module")
def judge():
    return load_judge("shapes-judge")


def test_a_model_that_draws_the_concept_has_ua_near_zero(judge):
    metrics = Evaluator(judge, CONFIG).evaluate(RenderingModel(), forgotten=("striped",))
    assert set(T2I_METRIC_KEYS) <= set(metrics)
    assert metrics["ua"] <= 0.05 and metrics["ua_heldout_template"] <= 0.05 and metrics["ua_heldout_synonym"] <= 0.05
    assert metrics["ira"] >= 0.95 and metrics["cra"] >= 0.95
    colours = DEFAULT_ONTOLOGY.names("colour")
    shuffled = RenderingModel(swap={c: colours[(i + 3) % len(colours)] for i, c in enumerate(colours)})
    assert metrics["fd"] < 0.5 * Evaluator(judge, CONFIG).evaluate(shuffled, forgotten=("striped",))["fd"]


def test_ua_on_training_synonyms_catches_an_erasure_of_the_name_only(judge):
    metrics = Evaluator(judge, CONFIG).evaluate(RenderingModel(erased_words=("striped",)), forgotten=("striped",))
    assert metrics["ua"] >= 0.95 and metrics["ua_heldout_template"] >= 0.95
    assert metrics["ua_train_synonym"] <= 0.05 and metrics["ua_heldout_synonym"] <= 0.05
    assert metrics["ua_per_target"]["striped"]["train_synonym"] == metrics["ua_train_synonym"]
    assert metrics["ua_images"] == CONFIG.forget_prompts * CONFIG.images_per_prompt
    lower, upper = metrics["ua_interval_per_target"]["striped"]
    assert lower <= metrics["ua"] <= upper and upper - lower < 0.5


def test_a_model_that_never_learned_the_concept_has_ua_near_one(judge):
    metrics = Evaluator(judge, CONFIG).evaluate(RenderingModel(swap={"striped": "solid"}), forgotten=("striped",))
    assert metrics["ua"] >= 0.95
    assert metrics["ira"] >= 0.95 and metrics["cra"] >= 0.95  # retained prompts are unaffected


def test_a_combination_is_forgotten_when_either_part_is_missing(judge):
    metrics = Evaluator(judge, CONFIG).evaluate(RenderingModel(swap={"triangle": "square"}), forgotten=("striped triangle",))
    assert metrics["ua"] >= 0.95


def test_results_are_cached_by_model_hash(judge, tmp_path):
    calls = []

    class Counting(RenderingModel):
        def sample(self, prompts, **kwargs):
            calls.append(len(prompts))
            return super().sample(prompts, **kwargs)

    evaluator = Evaluator(judge, EvalConfig(forget_prompts=1, retain_prompts=2, images_per_prompt=1), cache_dir=tmp_path)
    first = evaluator(Counting(), forgotten=("red",))
    sampled = len(calls)
    assert evaluator(Counting(), forgotten=("red",)) == first and len(calls) == sampled
    evaluator(Counting(swap={"red": "blue"}), forgotten=("red",))  # another model: sampled again
    assert len(calls) > sampled


def test_ua_splits_choose_what_is_sampled():
    assert EvalConfig(ua_splits="train").splits == ("train",)
    assert EvalConfig(ua_splits="heldout_synonym").splits == ("train", "heldout_synonym")
    assert EvalConfig().splits == ("train", "train_synonym", "heldout_template", "heldout_synonym")
    with pytest.raises(ValueError, match="ua_splits names heldout"):
        EvalConfig(ua_splits="heldout")
