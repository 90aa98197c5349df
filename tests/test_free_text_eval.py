"""Evaluating text-to-image stores outside the embedded world: against a judge whose answers are
known (a "model" that paints each concept a known colour and a judge that reads the colour), and
end to end on a tiny random Stable Diffusion store with a tiny random CLIP judge."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from obliviate.cli import app
from obliviate.engine import Store
from obliviate.evaluation.concept_judge import CLIPJudge, ContrastiveJudge
from obliviate.evaluation.evaluator import T2I_METRIC_KEYS
from obliviate.evaluation.free_text import FreeTextEvalConfig, FreeTextEvaluator
from obliviate.evaluation.metrics import CLIPScore
from sd_tiny import build_tiny_clip, build_tiny_sd

CONCEPTS = ("a cat", "a dog", "a cow", "a horse")
SMALL = dict(judge="-", forget_prompts=3, retain_prompts=6, images_per_prompt=2, steps=2)
runner = CliRunner()


class PaintingModel:
    """Paints every image a flat grey whose level is the index of the concept its prompt names;
    ``draws`` maps a concept to the one painted instead (an erasure that maps cat to dog)."""

    def __init__(self, draws: dict[str, str] | None = None):
        self.draws = draws or {}

    def sample(self, prompts, steps=0, seed=0, solver="", **_):
        named = [next(c for c in CONCEPTS if c in p) for p in prompts]
        levels = torch.tensor([CONCEPTS.index(self.draws.get(c, c)) / 10 for c in named])
        return levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


class LevelJudge:
    """Sees the concept whose index the grey level encodes; features are the level and its square."""

    def scores(self, images, concepts):
        index = (images.mean((1, 2, 3)) * 10).round().long()
        return torch.stack([(index == CONCEPTS.index(c)).float() if c in CONCEPTS else torch.zeros(len(index))
                            for c in concepts], 1)

    def features(self, images):
        level = images.mean((1, 2, 3))
        return torch.stack([level, level ** 2], 1) + 1e-3 * torch.randn(len(level), 2, generator=torch.Generator().manual_seed(0))


def evaluate(model, forgotten, reference=None, **options):
    config = FreeTextEvalConfig(**{**SMALL, "neutral": "", **options})
    return FreeTextEvaluator(LevelJudge(), config, retain=("a cow", "a horse"), reference=reference).evaluate(model, forgotten)


def test_a_model_that_still_draws_the_target_has_ua_zero_and_full_retention():
    metrics = evaluate(PaintingModel(), ("a cat",), reference=PaintingModel)
    assert set(T2I_METRIC_KEYS) <= set(metrics)
    assert metrics["ua"] == 0.0 and metrics["ua_per_target"] == {"a cat": {"prompts": 0.0}}
    assert metrics["ua_interval_per_target"]["a cat"][0] == 0.0 < metrics["ua_interval_per_target"]["a cat"][1] < 1
    assert metrics["ira"] == 1.0 and metrics["retained_accuracy"] == {"a cow": 1.0, "a horse": 1.0}
    assert metrics["cra"] is None and metrics["fd"] == pytest.approx(0.0, abs=1e-6)


def test_an_erased_target_counts_and_a_damaged_retained_concept_shows_in_ira_and_fd():
    model = PaintingModel(draws={"a cat": "a dog", "a horse": "a cow"})
    metrics = evaluate(model, ("a cat",), reference=PaintingModel, concepts=("a dog",))
    assert metrics["ua"] == 1.0 and metrics["ua_min"] == 1.0
    assert metrics["retained_accuracy"] == {"a cow": 1.0, "a horse": 0.0} and metrics["ira"] == 0.5
    assert metrics["fd"] > 1e-3  # the faithful model scores 0 to 1e-6


def test_ua_averages_over_targets_and_the_worst_is_reported():
    metrics = evaluate(PaintingModel(draws={"a cat": "a cow"}), ("a cat", "a dog"))
    assert metrics["ua_per_target"] == {"a cat": {"prompts": 1.0}, "a dog": {"prompts": 0.0}}
    assert metrics["ua"] == 0.5 and metrics["ua_min"] == 0.0
    assert metrics["fd"] is None  # no reference model to compare with


def test_a_forgotten_retained_concept_is_not_measured_as_retained():
    metrics = evaluate(PaintingModel(), ("a horse",))
    assert list(metrics["retained_accuracy"]) == ["a cow"]


def test_the_judge_chooses_among_forgotten_retained_further_and_neutral_concepts_once_each():
    config = FreeTextEvalConfig(**{**SMALL, "concepts": ("a dog", "a pig")})
    evaluator = FreeTextEvaluator(LevelJudge(), config, retain=("a cow", "a dog"))
    assert evaluator.concepts(("a cat",)) == ["a cat", "a cow", "a dog", "a pig", "something else"]


@pytest.mark.parametrize("options, message", [
    (dict(judge=""), "needs a judge"),
    (dict(label_template="a photo"), "label_template"),
    (dict(images_per_prompt=0), "images_per_prompt"),
    (dict(solver="nope"), "solver"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        FreeTextEvalConfig(**{**SMALL, **options})


def test_a_judge_without_the_interface_is_refused():
    with pytest.raises(TypeError, match="ConceptJudge"):
        FreeTextEvaluator(object(), FreeTextEvalConfig(**SMALL))


# --------------------------------------------------------------------------- CLIP score
unit_vectors = st.lists(st.floats(-1, 1, allow_nan=False), min_size=3, max_size=3).filter(lambda v: sum(x * x for x in v) > 1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(unit_vectors, unit_vectors), min_size=1, max_size=8), st.integers(1, 8))
def test_clip_score_is_100_times_the_clipped_cosine_however_it_is_batched(pairs, split):
    images = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    texts = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    whole, parts = CLIPScore(), CLIPScore()
    whole.update(images, texts)
    for start in range(0, len(pairs), split):
        parts.update(images[start:start + split], texts[start:start + split])
    expected = (100 * torch.nn.functional.cosine_similarity(images, texts).clamp(min=0)).mean()
    assert whole.compute() == pytest.approx(float(expected)) == pytest.approx(parts.compute())
    assert 0 <= whole.compute() <= 100


def test_clip_score_of_identical_and_opposite_embeddings():
    score = CLIPScore()
    score.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 4.0]]))
    assert score.compute() == pytest.approx(100.0)
    score.reset()
    score.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]]))
    assert score.compute() == 0.0


# --------------------------------------------------------------------------- a tiny CLIP on a tiny SD store
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("free-text")
    return build_tiny_sd(root / "sd"), build_tiny_clip(root / "clip")


def test_clip_judge_preprocesses_any_size_and_embeds_on_the_unit_sphere(folders):
    judge = CLIPJudge.from_folder(folders[1])
    assert isinstance(judge, ContrastiveJudge) and judge.image_size == 24
    images = torch.rand(3, 3, 16, 20)
    assert judge.preprocess(images).shape == (3, 3, 24, 24)
    assert torch.allclose(judge.features(images).norm(dim=-1), torch.ones(3))
    scores = judge.scores(images, ["a cat", "a dog"])
    expected = judge.image_embeddings(images) @ judge.text_embeddings(["a photo of a cat", "a photo of a dog"]).T
    assert torch.allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("folder, message", [("nowhere", "No CLIP model"), ("sd/unet", "must be a CLIP model")])
def test_a_judge_folder_that_is_not_clip_is_refused(folders, folder, message):
    with pytest.raises(ValueError, match=message):
        CLIPJudge.from_folder(folders[0].parent / folder)


def test_eval_on_a_stable_diffusion_store_records_the_same_keys_and_a_report(folders, tmp_path):
    sd, clip = folders
    store = tmp_path / "store"
    options = ["judge=" + str(clip), "forget_prompts=2", "retain_prompts=2", "images_per_prompt=1", "steps=2"]
    result = runner.invoke(app, ["init", str(store), "--model", str(sd), "--retain", "a dog", "--retain", "a cow",
                                 "--evaluate", *[a for o in options for a in ("--eval-set", o)]])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["request", "add", str(store), "a cat", "--method", "uce"]).exit_code == 0
    result = runner.invoke(app, ["apply", str(store)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(store), "--json", "--base"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert set(T2I_METRIC_KEYS) <= set(metrics) and metrics["forgotten"] == ["a cat"]
    assert 0 <= metrics["ua"] <= 1 and 0 <= metrics["ira"] <= 1 and metrics["fd"] >= 0
    assert 0 <= metrics["clip_score"] <= 100 and 0 <= metrics["clip_score_forgotten"] <= 100
    assert metrics["base"]["fd"] == pytest.approx(0.0, abs=1e-6)  # the base model is the reference
    rows = [e for e in Store(store).ledger.events() if e.kind == "evaluate"]
    assert rows and rows[-1].payload["metrics"]["ua"] == metrics["ua"]
    assert Store(store).status()["requests"][0]["metrics"]["clip_score"] == metrics["clip_score"]
    result = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "report.html")])
    assert result.exit_code == 0, result.output
    assert "CLIP score" in (tmp_path / "report.html").read_text()


def test_a_stable_diffusion_store_without_a_judge_is_told_how_to_name_one(folders, tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "store"), "--model", str(folders[0]), "--evaluate"])
    assert result.exit_code == 2 and "judge=FOLDER" in result.output and not (tmp_path / "store").exists()
