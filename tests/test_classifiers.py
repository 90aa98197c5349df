"""The classifier side: data and targets, the bundle, every method's defining properties, the
evaluation against the retrain oracle, and the engine end to end on the shipped digits CNN."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from obliviate.classifiers.data import load_dataset
from obliviate.classifiers.models import ClassifierModel
from obliviate.classifiers.targets import DataTargets
from obliviate.classifiers.train import ClassifierRecipe, train_classifier
from obliviate.engine import Request, Store
from obliviate.hashing import tensor_hash
from obliviate.evaluation.classifier import (ClassifierEvalConfig, ClassifierEvaluator, accuracy, mia_efficacy,
                                             relearn_steps)
from obliviate.methods import METHODS, UnlearningContext, get_method
from obliviate.methods.classifier.fgoriu import _project, energy_basis, merge_bases
from obliviate.methods.classifier.salun import top_fraction_mask
from obliviate.methods.classifier.scrub import distill_kl
from obliviate.methods.classifier.undo import reinitialised
from obliviate.models.zoo import resolve_model_path

DIGITS = DataTargets("digits")
QUICK = {"ft": {"epochs": 1}, "rl": {"epochs": 1}, "salun": {"epochs": 1}, "scrub": {"epochs": 1, "max_epochs": 1},
         "sfron": {"iterations": 20}, "ugclu": {"iterations": 20}, "ga": {}, "fgoriu": {"epochs": 10},
         "undo": {"epochs": 1, "method": "fgoriu;epochs=2"}}


def digits_cnn() -> ClassifierModel:
    return ClassifierModel.load(resolve_model_path("digits-cnn"))


def run_method(name: str, targets=("3",), model=None, forgotten=(), state=None, seed=0, **options):
    model = model or digits_cnn()
    method = get_method(name, "classifier").from_options({**QUICK[name], **options})
    context = UnlearningContext(prompts=DIGITS, base_weights=model.state_tensors(), forgotten=forgotten, state=state or {})
    result = method.unlearn(model, Request(tuple(targets), name, seed=seed), context)
    edited = digits_cnn() if model is None else model
    edited.load_state_tensors(result.edit.apply(edited.state_tensors()))
    return edited, result


# ------------------------------------------------------------------ data and targets
def test_digit_splits_are_fixed_and_stratified():
    data = load_dataset("digits")
    assert len(data.train_y) + len(data.test_y) == 1797
    counts = data.test_y.bincount()
    assert counts.min() >= 50 and counts.max() <= 56  # 30% of every class
    assert torch.equal(load_dataset.__wrapped__("digits").train_x, data.train_x)  # rebuilt identically


def test_targets_split_partitions_the_training_data():
    split = DIGITS.split(("3", "sample:0", "sample:5"))
    assert len(split.forget_y) + len(split.retain_y) == len(DIGITS.dataset.train_y)
    assert (split.forget_y == 3).sum() == (DIGITS.dataset.train_y == 3).sum()
    assert not (split.retain_y == 3).any() and not (split.test_y == 3).any()
    assert {0, 5} <= set(split.forget_index.tolist())


@pytest.mark.parametrize("targets, anchor, message", [
    (("11",), None, "no class '11'. Did you mean '1'"),
    (("sample:99999",), None, "not a training sample"),
    (("sample:x",), None, "not a training sample"),
    (("3",), "4", "take no anchor"),
    (("3", "3"), None, "named twice"),
])
def test_bad_targets_are_explained(targets, anchor, message):
    with pytest.raises(ValueError, match=message):
        DIGITS.validate(targets, anchor)


def test_bundle_round_trips_bit_exactly(tmp_path):
    model = digits_cnn()
    model.save(tmp_path / "m")
    again = ClassifierModel.load(tmp_path / "m")
    assert tensor_hash(again.state_tensors()) == tensor_hash(model.state_tensors())
    assert again.recipe == model.recipe and again.dataset == "digits"


def test_vit_bundle_classifies_well():
    vit = ClassifierModel.load(resolve_model_path("digits-vit"))
    split = DIGITS.split(())
    assert accuracy(vit, split.test_x, split.test_y) > 0.95


# ------------------------------------------------------------------ methods
CLASSIFIER_METHODS = sorted(METHODS["classifier"])


def test_every_classifier_method_is_registered_apart_from_diffusion_ones():
    assert set(CLASSIFIER_METHODS) == {"ft", "ga", "rl", "salun", "scrub", "sfron", "fgoriu", "ugclu", "undo"}
    assert get_method("ga", "classifier") is not get_method("ga", "t2i")
    with pytest.raises(ValueError, match="Unknown classifier method 'esd'"):
        get_method("esd", "classifier")


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_method_changes_the_model_reproducibly(name):
    _, first = run_method(name)
    _, second = run_method(name)
    assert first.edit.deltas, f"{name} is a no-op"
    assert first.edit.deltas.keys() == second.edit.deltas.keys()
    assert all(torch.equal(first.edit.deltas[k], second.edit.deltas[k]) for k in first.edit.deltas)
    assert first.stats["backward_passes"] > 0
    _, other_seed = run_method(name, seed=1)
    assert not all(torch.equal(first.edit.deltas[k], other_seed.edit.deltas[k]) for k in first.edit.deltas)


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_only_targeted_parameters_move(name):
    # fgoriu's objective (undo's teacher by default) lives in the features, which the head does not produce
    layer = "body.9" if name in ("fgoriu", "undo") else "head"
    _, result = run_method(name, trainable=rf"^{layer}\.weight$")
    assert set(result.edit.deltas) == {f"net.{layer}.weight"}


def test_fgoriu_explains_a_trainable_set_that_cannot_move_the_features():
    with pytest.raises(ValueError, match="below the head"):
        run_method("fgoriu", trainable=r"^head\.weight$")


@pytest.mark.parametrize("name", ["rl", "salun", "sfron", "ugclu", "fgoriu"])
def test_forgetting_methods_forget_a_class_and_keep_the_rest(name):
    options = {"rl": {"epochs": 2}, "salun": {"epochs": 2}, "fgoriu": {"epochs": 10}}.get(name, {"iterations": 60})
    model, _ = run_method(name, **options)
    split = DIGITS.split(("3",))
    assert accuracy(model, split.forget_x, split.forget_y) < 0.1
    assert accuracy(model, split.test_x, split.test_y) > 0.85


def test_distill_kl_matches_its_formula():
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    t = 3.0
    p = F.softmax(teacher / t, 1)
    expected = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert torch.allclose(distill_kl(student, teacher, t), expected, atol=1e-6)


@given(st.floats(0.05, 1.0))
@settings(max_examples=20, deadline=None)
def test_saliency_mask_keeps_the_top_fraction(fraction):
    scores = {"a": torch.arange(60.0).reshape(6, 10), "b": torch.arange(60.0, 100.0)}
    mask = top_fraction_mask(scores, fraction)
    kept = sum(m.sum().item() for m in mask.values())
    assert kept == max(1, round(fraction * 100))
    assert mask["b"][-1] == 1  # the largest score is always kept


def test_salun_moves_only_salient_weights():
    _, result = run_method("salun", saliency=0.1)
    moved = sum((d != 0).sum().item() for d in result.edit.deltas.values())
    total = sum(p.numel() for p in digits_cnn().net.parameters())
    assert 0 < moved <= 0.1 * total + 1


@pytest.mark.parametrize("weighting", ["per-sample", "batch"])
def test_sfron_forget_step_is_adaptively_weighted(weighting):
    from obliviate.methods.classifier.sfron import SFRon
    model = digits_cnn()
    method = SFRon.from_options({"iterations": 1, "weighting": weighting})
    x, y = DIGITS.split(("3",)).forget_x[:8], DIGITS.split(("3",)).forget_y[:8]

    class Session:
        net = model.net
        forget_x, forget_y = x, y

        @staticmethod
        def random_batch(a, b):
            return a, b

    loss = method.forget_loss(Session, alpha=2.0)
    ce = F.cross_entropy(model.net(x), y, reduction="none")
    if weighting == "batch":
        expected = -2.0 * ce.mean() / ce.mean().detach().sqrt()
    else:  # the reference's AdaptiveLoss: 1/l_i^0.5, normalised to sum to the batch size
        inverse = 1 / ce.detach().sqrt()
        expected = -2.0 * (inverse / inverse.sum() * len(ce) * ce).mean()
    assert torch.allclose(loss, expected)


@given(st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=64))
@settings(max_examples=50, deadline=None)
def test_sfron_per_sample_weights_sum_to_the_batch_size_and_favour_small_losses(losses):
    from obliviate.methods.classifier.sfron import adaptive_ascent_weights
    losses = torch.tensor(losses, dtype=torch.float64)
    weights = adaptive_ascent_weights(losses)
    assert float(weights.sum()) == pytest.approx(len(losses))
    order = losses.argsort()
    assert (weights[order].diff() <= 1e-9).all()  # the larger the loss, the smaller its weight


def test_sfron_masks_the_forget_step_only():
    """The reference masks the forget ascent; the retain descent moves every trainable weight."""
    _, result = run_method("sfron", iterations=5, gamma=1e9)  # a mask that keeps nothing
    moved = sum(int((d != 0).sum()) for d in result.edit.deltas.values())
    assert moved > 0.5 * sum(p.numel() for p in digits_cnn().net.parameters())
    with pytest.raises(RuntimeError, match="left every weight unchanged"):  # masking the retain step too
        run_method("sfron", iterations=5, gamma=1e9, mask_retain=True)


@given(st.integers(1, 6), st.integers(0, 1000))
@settings(max_examples=20, deadline=None)
def test_projected_gradient_is_orthogonal_to_the_protected_subspace(k, seed):
    g = torch.Generator().manual_seed(seed)
    basis = merge_bases(torch.randn(12, k, generator=g, dtype=torch.float64))
    complement = (torch.eye(12, dtype=torch.float64) - basis @ basis.T).float()
    weight = torch.zeros(5, 3, 2, 2)  # a conv kernel: fan-in 12
    projected = _project(torch.randn(5, 3, 2, 2, generator=g), complement, weight)
    assert torch.allclose(projected.reshape(5, 12) @ basis.float(), torch.zeros(5, basis.shape[1]), atol=1e-5)


def test_energy_basis_keeps_the_requested_energy():
    rows = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.tensor([10.0, 1.0, 0.1]))
    assert energy_basis(rows, 0.9).shape[1] == 1  # the first direction holds ~99% of the energy
    assert energy_basis(rows, 0.999999).shape[1] == 3
    first = energy_basis(rows, 0.9)
    rest = energy_basis(rows, 0.9, exclude=first)
    assert rest.shape[1] == 1 and abs(float(rest.T @ first)) < 1e-8


def test_fgoriu_bias_correction_moves_only_the_forgotten_class():
    _, result = run_method("fgoriu", trainable=r"^body\.9\.weight$|^head\.bias$")
    assert set(result.edit.deltas) == {"net.body.9.weight", "net.head.bias"}
    moved = result.edit.deltas["net.head.bias"].nonzero().flatten().tolist()
    assert moved == [3] and result.edit.deltas["net.head.bias"][3] < 0


def test_fgoriu_keeps_retained_inputs_of_the_first_layer_and_merges_subspaces():
    model, result = run_method("fgoriu", epochs=5, trainable=r"weight$")
    first = "body.0"
    delta = result.edit.deltas[f"net.{first}.weight"].reshape(32, -1).double()
    remaining = result.state[f"remain/{first}"].double()
    assert torch.allclose(delta @ remaining, torch.zeros(32, remaining.shape[1], dtype=torch.float64), atol=1e-5)
    _, second = run_method("fgoriu", targets=("8",), model=model, forgotten=("3",), state=result.state, epochs=5)
    before, after = result.state["forget/head"].double(), second.state["forget/head"].double()
    # the earlier forgetting subspace is contained in the merged one
    assert torch.allclose(after @ (after.T @ before), before, atol=1e-4)


def test_ugclu_learns_a_new_class_while_forgetting():
    recipe = ClassifierRecipe(epochs=8)
    model = train_classifier(recipe, exclude=("9",))
    nines = DIGITS.split(("9",))
    before = accuracy(model, nines.forget_test_x, nines.forget_test_y)
    edited, _ = run_method("ugclu", model=model, learn="9", iterations=60)
    three = DIGITS.split(("3",))
    assert before < 0.05
    assert accuracy(edited, nines.forget_test_x, nines.forget_test_y) > 0.6
    assert accuracy(edited, three.forget_x, three.forget_y) < 0.2
    with pytest.raises(ValueError, match="cannot learn"):
        run_method("ugclu", learn="3")


# ------------------------------------------------------------------ evaluation
def test_mia_calls_low_confidence_non_members():
    class Fixed:
        """Confidence in the true label is what the attack sees; this model's is fixed per input."""
        device = torch.device("cpu")

        class net:
            @staticmethod
            def eval():
                pass

            def __new__(cls, x):
                return torch.stack([x[:, 0], torch.zeros(len(x))], dim=1) * 10

    members = (torch.ones(50, 1), torch.zeros(50, dtype=torch.long))          # confident
    others = (torch.full((50, 1), 0.3), torch.zeros(50, dtype=torch.long))    # less confident
    unlearned = (torch.full((20, 1), -1.0), torch.zeros(20, dtype=torch.long))
    remembered = (torch.ones(20, 1), torch.zeros(20, dtype=torch.long))
    assert mia_efficacy(Fixed, members, others, unlearned) == 1.0
    assert mia_efficacy(Fixed, members, others, remembered) == 0.0
    # Members no more confident than non-members: no monotone signal, a coin flip, never an
    # inverted attack that calls the least confident examples members.
    assert mia_efficacy(Fixed, others, members, unlearned) == 0.5
    assert mia_efficacy(Fixed, others, members, remembered) == 0.5


def test_relearn_is_instant_for_a_model_that_never_forgot():
    split = DIGITS.split(("3",))
    assert relearn_steps(digits_cnn(), split.forget_x, split.forget_y, 0.9, 10) == 0


def test_relearning_attacker_is_configurable_and_checked():
    with pytest.raises(ValueError, match="relearn_optimizer must be one of"):
        ClassifierEvalConfig(relearn_optimizer="rmsprop")
    forgot, _ = run_method("rl", epochs=2)
    split = DIGITS.split(("3",))
    relearn = lambda **recipe: relearn_steps(forgot, split.forget_x, split.forget_y, 0.9, 30, **recipe)  # noqa: E731
    assert relearn(optimizer="adam", learning_rate=1e-2) < 30
    assert relearn(optimizer="adam", learning_rate=1e-9) == 30  # the attacker's learning rate is the one used


def test_evaluator_reports_the_gap_to_a_real_retrain_oracle():
    config = ClassifierEvalConfig(relearn=False, probe=False)
    base = ClassifierEvaluator(config)(digits_cnn(), forgotten=("3",))
    assert base["ua"] < 0.05 and base["oracle"]["ua"] > 0.95  # the oracle never saw a 3
    expected = np.mean([abs(base[k] - base["oracle"][k]) for k in ("ua", "ra", "ta", "mia")]) * 100
    assert math.isclose(base["gap"], expected, abs_tol=0.01) and base["gap"] > 40
    forgot, _ = run_method("rl", epochs=2)
    assert ClassifierEvaluator(config)(forgot, forgotten=("3",))["gap"] < 5


# ------------------------------------------------------------------ undo: distillation into a noised copy
def test_reinitialised_redraws_every_layer_under_its_seed_and_leaves_the_rng_alone():
    net = digits_cnn().net
    rng = torch.random.get_rng_state()
    first, again, other = reinitialised(net, 0), reinitialised(net, 0), reinitialised(net, 1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name, weight in net.named_parameters():
        assert not torch.equal(first.get_parameter(name), weight)
        assert torch.equal(first.get_parameter(name), again.get_parameter(name))
        assert not torch.equal(first.get_parameter(name), other.get_parameter(name))


def test_undo_without_noise_distils_back_the_teachers_predictions():
    teacher, _ = run_method("fgoriu", epochs=2)
    student, _ = run_method("undo", noise="0", epochs=2)
    split = DIGITS.split(("3",))
    agreement = (student.predict(split.test_x) == teacher.predict(split.test_x)).float().mean()
    assert agreement > 0.99 and accuracy(student, split.forget_x, split.forget_y) < 0.05


@pytest.mark.parametrize("options, message", [
    ({"method": "undo"}, "distil a distillation"),
    ({"method": "esd"}, "Unknown classifier method 'esd'"),
    ({"method": "rl;epochs=0"}, "positive"),
    ({"noise": "1"}, "noise"),
    ({"temperature": "0"}, "temperature"),
])
def test_undo_explains_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("undo", "classifier").from_options(options)


def test_undo_keeps_its_teacher_inside_its_own_trainable_set():
    with pytest.raises(ValueError, match="within undo's trainable"):
        run_method("undo", trainable=r"^body\.9\.", method=r"fgoriu;trainable=^head\.")


@pytest.mark.slow
def test_undo_makes_a_forgotten_sequence_slower_to_relearn_than_its_teacher():
    relearn = {}
    for name in ("fgoriu", "undo"):
        model, state, forgotten = digits_cnn(), {}, ()
        for target in ("3", "8", "1", "5"):
            defaults = {"epochs": 30, "method": "fgoriu"} if name == "undo" else {}
            model, result = run_method(name, (target,), model, forgotten, state, **defaults)
            state, forgotten = result.state, forgotten + (target,)
        split = DIGITS.split(forgotten)
        relearn[name] = relearn_steps(model, split.forget_x, split.forget_y, 0.9, 100)
    assert relearn["undo"] >= 2 * relearn["fgoriu"] + 10, relearn


# ------------------------------------------------------------------ the engine
def test_store_applies_class_and_sample_requests_and_rolls_back(tmp_path):
    store = Store.init(tmp_path / "s", "digits-cnn")
    assert store.info["kind"] == "classifier"
    base_hash = store.state().model_event.model_hash
    store.add_request(["3"], "rl", {"epochs": 1})
    store.add_request([f"sample:{i}" for i in range(10)], "salun", {"epochs": 1})
    outcomes = store.apply(evaluator=ClassifierEvaluator(ClassifierEvalConfig(oracle=False, relearn=False, probe=False)))
    assert [o.metrics["ua"] > 0.5 for o in outcomes] == [True, True]
    assert store.status()["requests"][1]["label"].startswith("10 targets")
    assert store.verify() == []
    assert store.rollback(0) == base_hash
    with pytest.raises(ValueError, match="Unknown classifier method"):
        store.add_request(["3"], "esd")
    assert len(store.state().requests) == 2


def test_cli_forgets_samples_from_a_file(tmp_path):
    from typer.testing import CliRunner
    from obliviate.cli import app
    runner = CliRunner()
    store = tmp_path / "s"
    assert runner.invoke(app, ["init", str(store), "--model", "digits-cnn", "--evaluate", "--eval-set", "oracle=false",
                               "--eval-set", "relearn=false", "--eval-set", "probe=false"]).exit_code == 0
    (tmp_path / "ids.txt").write_text("4 8, 15\n16")
    result = runner.invoke(app, ["request", "add", str(store), "--samples", str(tmp_path / "ids.txt"), "--method", "rl"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["apply", str(store)]).exit_code == 0
    metrics = json.loads(runner.invoke(app, ["eval", str(store), "--json", "--no-record"]).output)
    assert metrics["forgotten"] == ["sample:4", "sample:8", "sample:15", "sample:16"]
    assert {"ua", "ra", "ta", "mia"} <= set(metrics)
    compared = json.loads(runner.invoke(app, ["eval", str(store), "--json", "--no-record", "--base"]).output)
    assert compared["base"]["forgotten"] == metrics["forgotten"]
    assert compared["base"]["ua"] == 0.0  # the base model still classifies the samples it was trained on
    (tmp_path / "bad.txt").write_text("4 x")
    bad = runner.invoke(app, ["request", "add", str(store), "--samples", str(tmp_path / "bad.txt")])
    assert bad.exit_code != 0 and "not a sample index" in bad.output


def test_report_of_a_classifier_store_shows_predictions_and_gap(tmp_path):
    from obliviate.report import write_report
    store = Store.init(tmp_path / "s", "digits-cnn")
    store.add_request(["3"], "rl", {"epochs": 1})
    store.apply(evaluator=ClassifierEvaluator(ClassifierEvalConfig(relearn=False, probe=False)))
    page = write_report(store, tmp_path / "r" / "report.html").read_text()
    assert "Forgotten data: base model" in page and "Retained test data" in page
    assert "<th>GAP</th>" in page and "<th>IRA</th>" not in page
    assert (tmp_path / "r" / "report_forgotten.png").is_file()
    with pytest.raises(ValueError, match="Attacks target text-to-image stores"):
        store.attack(None, "3", None)


def test_oracle_is_cached_on_disk_and_identical(tmp_path):
    from obliviate.evaluation.classifier import _train_oracle, retrain_oracle
    model = digits_cnn()
    first, seconds = retrain_oracle(model, ("3",), tmp_path)
    _train_oracle.cache_clear()
    again, cached_seconds = retrain_oracle(model, ("3",), tmp_path)
    assert cached_seconds == seconds and len(list(tmp_path.iterdir())) == 1
    assert tensor_hash(again.state_tensors()) == tensor_hash(first.state_tensors())


def test_methods_that_run_no_regularizer_refuse_one(tmp_path, tiny_model_dir):
    from obliviate.engine import RegularizerSpec
    store = Store.init(tmp_path / "c", "digits-cnn")
    with pytest.raises(ValueError, match="does not run regularizers"):
        store.add_request(["3"], "salun", regularizers=(RegularizerSpec("l2sp"),))
    t2i = Store.init(tmp_path / "t", str(tiny_model_dir))
    with pytest.raises(ValueError, match="does not run regularizers.*esd"):
        t2i.add_request(["striped"], "uce", regularizers=(RegularizerSpec("gradproj"),))
    t2i.add_request(["striped"], "esd", regularizers=(RegularizerSpec("gradproj"),))
    assert not store.state().requests


@given(st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_random_labels_are_wrong_and_never_a_forgotten_class(seed):
    from obliviate.methods.classifier.base import ClassifierSession
    session = ClassifierSession.__new__(ClassifierSession)
    session.known_classes = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9])  # 3 forgotten
    session.generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(seed + 1))
    labels = session.random_labels(truth)
    assert (labels != truth).all() and not (labels == 3).any()
