"""The evaluator against models whose drawings are known exactly: a "model" that renders what
each prompt says, and one that never learned "striped" (draws solid instead)."""

import zlib

import numpy as np
import pytest
import torch

from obliviate.evaluation.evaluator import T2I_METRIC_KEYS, EvalConfig, Evaluator
from obliviate.models.zoo import load_judge
from obliviate.world import DEFAULT_ONTOLOGY, render, sample_scenes

CONFIG = EvalConfig(forget_prompts=4, retain_prompts=20, images_per_prompt=4)


class RenderingModel:
    """Draws exactly the concepts its prompt names (by any of their words), optionally swapping
    some; ``erased_words``, and a domain the prompt leaves out, are drawn as the first concept of
    their domain, as by a model whose erasure cut those words only."""

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
                # the longest word wins: "hollow circle" is a ring
                concept, word = max(said, key=lambda pair: len(pair[1])) if said else (onto.in_domain(domain)[0], None)
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


def test_a_forgotten_concept_drawn_for_other_prompts_counts_as_unasked(judge):
    evaluator = Evaluator(judge, CONFIG)
    faithful = evaluator.evaluate(RenderingModel(), forgotten=("striped",))
    assert faithful["unasked"] <= 0.02 and faithful["unasked_per_target"] == {"striped": faithful["unasked"]}
    moved = evaluator.evaluate(RenderingModel(swap={"dotted": "striped"}), forgotten=("striped",))  # dots became stripes
    retained = evaluator._retained_labels([evaluator.prompts.target_groups(("striped",))[0]], CONFIG.retain_prompts)
    asked_dotted = float(np.mean(retained[:, 2] == DEFAULT_ONTOLOGY.index("dotted")))
    assert asked_dotted > 0 and abs(moved["unasked"] - asked_dotted) <= 0.05


def test_a_combination_is_forgotten_when_either_part_is_missing(judge):
    metrics = Evaluator(judge, CONFIG).evaluate(RenderingModel(swap={"triangle": "square"}), forgotten=("striped triangle",))
    assert metrics["ua"] >= 0.95


class HalfErased(RenderingModel):
    """Draws striped only in the prompts whose CRC is even, as if its erasure held on the others."""

    def __init__(self):
        super().__init__()
        self.erased = RenderingModel(swap={"striped": "solid"})

    @staticmethod
    def revived(prompt: str) -> bool:
        return zlib.crc32(prompt.encode()) % 2 == 0

    def sample(self, prompts, steps=0, seed=0, solver="", **_):
        revived = torch.tensor([self.revived(p) for p in prompts])[:, None, None, None]
        return torch.where(revived, super().sample(prompts, seed=seed), self.erased.sample(prompts, seed=seed))


@pytest.mark.parametrize("short", [False, True])
def test_the_images_judged_to_show_a_target_are_uas_misses_with_their_prompts(judge, short):
    config = EvalConfig(forget_prompts=8, retain_prompts=4, images_per_prompt=2, short_prompts=True)
    model, evaluator, split = HalfErased(), Evaluator(judge, config), "short" if short else "train"
    metrics = evaluator.evaluate(model, forgotten=("striped", "red"))
    judged = evaluator.judged_as_target(model, ("striped", "red"), short=short)
    for target in ("striped", "red"):  # red is drawn everywhere; the second target checks the prompts' draw order
        images, prompts = judged[target]
        assert len(images) == len(prompts) == round((1 - metrics["ua_per_target"][target][split]) * metrics["ua_images"])
    images, prompts = judged["striped"]
    assert 0 < len(images) < metrics["ua_images"] and all(HalfErased.revived(p) for p in prompts)
    assert len(judged["red"][0]) == metrics["ua_images"]


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


class SupertypeModel(RenderingModel):
    """For a prompt naming only a supertype, draws the member ``draws`` gives it (the other
    domains red, solid, square)."""

    def __init__(self, draws: dict[str, str]):
        super().__init__()
        self.draws = draws

    def state_tensors(self):
        return {"draws": torch.tensor([DEFAULT_ONTOLOGY.index(m) for m in self.draws.values()])}

    def sample(self, prompts, **kwargs):
        def drawn(prompt):
            named = [s for s in DEFAULT_ONTOLOGY.supertypes if f" {s}" in f" {prompt}"]
            if not named:
                return prompt
            words = {"shape": "square", "colour": "red", "texture": "solid"}
            member = self.draws[named[0]]
            words[DEFAULT_ONTOLOGY.get(member).domain] = member
            return f"a {words['colour']} {words['texture']} {words['shape']}"
        return super().sample([drawn(p) for p in prompts], **kwargs)


@pytest.mark.parametrize("member, accuracy, forgotten_share", [("circle", 1.0, 1.0), ("ellipse", 1.0, 0.0), ("square", 0.0, 0.0)])
def test_supertype_prompts_are_judged_against_the_supertypes_members(judge, member, accuracy, forgotten_share):
    config = EvalConfig(forget_prompts=1, retain_prompts=2, images_per_prompt=2, supertypes=True)
    model = SupertypeModel({"round": member, "polygon": "triangle", "pattern": "striped"})
    metrics = Evaluator(judge, config).evaluate(model, forgotten=("circle", "striped triangle"))
    assert set(metrics["supertype"]) == {"round", "pattern", "polygon"}  # a combination names both its parents
    assert metrics["supertype"]["round"] == {"accuracy": accuracy, "forgotten_share": forgotten_share, "images": 6 * 2}  # 6 prompts name it
    # triangle and striped were forgotten only together, so neither counts as a forgotten member
    for supertype in ("polygon", "pattern"):
        assert metrics["supertype"][supertype]["accuracy"] == 1.0 and metrics["supertype"][supertype]["forgotten_share"] == 0.0
    assert metrics["supertype_accuracy"] == pytest.approx((accuracy + 2) / 3, abs=1e-4)
    without = Evaluator(judge, EvalConfig(forget_prompts=1, retain_prompts=2, images_per_prompt=1)).evaluate(model, forgotten=("circle",))
    assert "supertype" not in without and "supertype_accuracy" not in without


class DefaultTexture(RenderingModel):
    """Draws a prompt that names no texture in ``default`` (other domains as ``RenderingModel``)."""

    def __init__(self, default: str):
        super().__init__()
        self.default = default

    def state_tensors(self):
        return {"default": torch.tensor(DEFAULT_ONTOLOGY.index(self.default))}

    def sample(self, prompts, **kwargs):
        textures = [w for c in DEFAULT_ONTOLOGY.in_domain("texture") for w in c.words]
        return super().sample([p if any(f" {w} " in f" {p} " for w in textures) else f"{p} {self.default}" for p in prompts],
                              **kwargs)


@pytest.mark.parametrize("default, share", [("dotted", 1.0), ("solid", 0.0)])
def test_unnamed_prompts_find_a_forgotten_concept_the_model_draws_where_no_prompt_names_it(judge, default, share):
    config = EvalConfig(forget_prompts=4, retain_prompts=2, images_per_prompt=2, ua_splits="train", unnamed_prompts=True)
    metrics = Evaluator(judge, config).evaluate(DefaultTexture(default), forgotten=("dotted", "blue"))
    assert metrics["unnamed_per_target"]["dotted"] == share  # its prompts name no texture, so draw the default
    assert metrics["unnamed_per_target"]["blue"] == 0.0  # an unnamed colour is drawn red
    assert metrics["unnamed"] == pytest.approx(share / 2)
    assert "unnamed" not in Evaluator(judge, EvalConfig(forget_prompts=1, retain_prompts=2, images_per_prompt=1)).evaluate(
        DefaultTexture(default), forgotten=("dotted",))


class FullPromptEraser(RenderingModel):
    """Draws a prompt's missing attributes as their domain's first concept; erases "striped"
    (draws it solid) only under prompts that name all three attributes, or under every prompt."""

    def __init__(self, everywhere: bool):
        super().__init__()
        self.everywhere = everywhere
        self.calls = []

    def sample(self, prompts, **kwargs):
        self.calls.append(prompts)
        onto = DEFAULT_ONTOLOGY

        def names(prompt, domain):
            return [w for c in onto.in_domain(domain) for w in c.words if f" {w} " in f" {prompt.replace(',', ' ')} "]

        filled = []
        for prompt in prompts:
            complete = all(names(prompt, d) for d in onto.domains)
            words = {d: (names(prompt, d) or [onto.names(d)[0]])[0] for d in onto.domains}
            if complete or self.everywhere:
                words["texture"] = "solid" if words["texture"] in onto.get("striped").words else words["texture"]
            filled.append(f"a {words['texture']} {words['colour']} {words['shape']}")
        return super().sample(filled, **kwargs)


@pytest.mark.parametrize("everywhere", [False, True])
def test_short_prompts_find_an_erasure_that_holds_on_full_prompts_only(judge, everywhere):
    config = EvalConfig(forget_prompts=6, retain_prompts=2, images_per_prompt=2, ua_splits="train", short_prompts=True)
    model = FullPromptEraser(everywhere)
    metrics = Evaluator(judge, config).evaluate(model, forgotten=("striped",))
    assert metrics["ua"] >= 0.9
    assert metrics["ua_short"] == metrics["ua_per_target"]["striped"]["short"]
    assert (metrics["ua_short"] >= 0.9) if everywhere else (metrics["ua_short"] <= 0.1)
    short = model.calls[1][::2]  # after the train split's, two images a prompt
    assert [len(p.split()) for p in short] == [3, 3, 2, 3, 3, 2] and all(p.split()[1] == "striped" for p in short)
    assert "ua_short" not in Evaluator(judge, EvalConfig(forget_prompts=1, retain_prompts=2, images_per_prompt=1)).evaluate(
        model, forgotten=("striped",))
