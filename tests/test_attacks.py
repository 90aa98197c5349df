import pytest
import torch

from obliviate.evaluation.attacks import ATTACKS, get_attack
from obliviate.evaluation.attacks.probe import probe_accuracy
from obliviate.models.judge import AttributeJudge
from obliviate.world import DEFAULT_ONTOLOGY, WorldPrompts

QUICK = {"prompts": 1, "images_per_prompt": 2, "sampling_steps": 2}


@pytest.fixture(scope="module")
def random_judge():
    torch.manual_seed(0)
    return AttributeJudge({d: len(DEFAULT_ONTOLOGY.in_domain(d)) for d in DEFAULT_ONTOLOGY.domains}).eval()


def test_probe_separates_separable_features_and_not_random_ones():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=gen)
    separable = torch.randn(200, 8, generator=gen) + 3 * labels[:, None].float()
    assert probe_accuracy(separable, labels, 200, seed=0) > 0.95
    noise = torch.randn(200, 8, generator=gen)
    assert probe_accuracy(noise, labels, 200, seed=0) < 0.7


@pytest.mark.parametrize("name,options", [
    ("relearn", {**QUICK, "renders": 4, "checkpoints": "0,2", "batch_size": 2}),
    ("relearn", {**QUICK, "renders": 4, "checkpoints": "0,2", "batch_size": 2, "optimizer": "sgd", "lora_rank": 2}),
    ("resurgence", {**QUICK, "renders": 4, "checkpoints": "0,2", "batch_size": 2, "trainable": "xattn"}),
    ("prompt", {**QUICK, "iterations": 8, "renders": 4, "batch_size": 4, "learning_rate": 0.05}),
    ("inversion", {**QUICK, "iterations": 8, "renders": 4, "batch_size": 4, "learning_rate": 0.05}),
    ("probe", {"samples": 16, "iterations": 20}),
    ("paraphrase", {**QUICK, "candidates": 3, "screen_images": 1, "top": 2}),
    ("noise", {**QUICK, "etas": "0/1"}),
])
def test_attacks_leave_the_model_untouched_and_report_rates(tiny_t2i, random_judge, name, options):
    before = tiny_t2i.state_tensors()
    attack = get_attack(name).from_options({k: str(v) for k, v in options.items()})
    result = attack.run(tiny_t2i, "striped", random_judge, WorldPrompts(), seed=0)
    after = tiny_t2i.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert 0 <= result.before <= 1 and 0 <= result.after <= 1 and result.concept == "striped"
    if name in ("relearn", "resurgence"):
        assert [step for step, _ in result.curve] == [0, 2]
        assert result.auc == pytest.approx((result.curve[0][1] + result.curve[1][1]) / 2)


def test_the_inverter_regenerating_its_own_inversion_redraws_what_it_inverted(tiny_model_dir, random_judge):
    from obliviate.models.t2i import T2IModel
    model = T2IModel.load(tiny_model_dir)
    attack = get_attack("regenerate").from_options({**QUICK, "renders": 4, "steps": 3, "inverter": str(tiny_model_dir)})
    result = attack.run(model, "striped", random_judge, WorldPrompts(), seed=0)
    assert result.after == result.details["inverter_redraws"]  # same model: the round trip is exact
    with pytest.raises(ValueError, match="positive"):
        get_attack("regenerate").from_options({"steps": "0"})


def test_handing_over_to_the_same_model_changes_nothing(tiny_model_dir, random_judge):
    """Completion splits one sampling run between two models; with one model on both sides the
    images, and so every point of the curve, are those of the model alone."""
    from obliviate.models.t2i import T2IModel
    model = T2IModel.load(tiny_model_dir)
    attack = get_attack("completion").from_options({**QUICK, "sampling_steps": 4, "handoffs": "0/1/3",
                                                     "starter": str(tiny_model_dir)})
    result = attack.run(model, "striped", random_judge, WorldPrompts(), seed=0)
    assert [step for step, _ in result.curve] == [0, 1, 3]
    assert len({rate for _, rate in result.curve}) == 1
    from obliviate.models.t2i import SOLVERS
    noise, encoding = torch.randn(2, 3, 16, 16), model.encode(["a red circle", "a blue star"])
    runs = []
    for split in (0, 2):
        scheduler = SOLVERS["dpm"].from_config(model.scheduler.config)
        scheduler.set_timesteps(4)
        first = model.denoise(noise, encoding, scheduler, scheduler.timesteps[:split])
        runs.append(model.denoise(first, encoding, scheduler, scheduler.timesteps[split:]))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="handoffs"):
        get_attack("completion").from_options({"handoffs": "0/20", "sampling_steps": "20"})


def test_relearnability_is_the_mean_success_over_the_attack():
    from obliviate.evaluation.attacks.base import AttackResult, curve_auc
    assert curve_auc(((0, 0.0), (10, 1.0), (20, 1.0))) == pytest.approx(0.75)
    assert curve_auc(((0, 0.5),)) is None
    oracle = AttackResult("relearn", "red", 0, 0.5, details={"auc": 0.25})
    result = AttackResult("relearn", "red", 0, 1, details={"auc": 0.75}, oracle=oracle)
    assert result.auc_gap == pytest.approx(0.5) and result.to_dict()["auc_gap"] == pytest.approx(0.5)
    assert AttackResult("prompt", "red", 0, 1, curve=((0, 0.0), (40, 1.0))).auc is None


def test_resurgence_never_fine_tunes_on_the_concept():
    from obliviate.evaluation.attacks.resurgence import retained_rows
    prompts = WorldPrompts()
    _, texts = retained_rows(prompts, "striped", 64, seed=3)
    assert not any("striped" in t or "stripe" in t for t in texts)


@pytest.mark.parametrize("name", ["prompt", "inversion"])
def test_optimising_attacks_lower_their_own_objective(tiny_t2i, random_judge, name):
    options = {**{k: str(v) for k, v in QUICK.items()}, "iterations": "30", "renders": "4", "batch_size": "4", "learning_rate": "0.1"}
    result = get_attack(name).from_options(options).run(tiny_t2i, "striped", random_judge, WorldPrompts(), seed=0)
    assert result.details["objective_after"] < result.details["objective_before"]


def test_unknown_attack_is_a_clear_error():
    assert {"relearn", "prompt", "paraphrase", "inversion", "probe"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="Did you mean 'prompt'"):
        get_attack("promt")


def test_attack_runs_beside_a_retrain_oracle_when_one_exists(tmp_path, tiny_model_dir, random_judge):
    import shutil

    from obliviate.engine import Store
    from obliviate.models.zoo import oracle_key
    store = Store.init(tmp_path / "s", tiny_model_dir)
    attack = get_attack("relearn").from_options({**{k: str(v) for k, v in QUICK.items()}, "renders": "2",
                                                 "checkpoints": "0,1", "batch_size": "2"})
    oracles = tmp_path / "oracles"
    assert store.attack(attack, "circle", random_judge, oracles_dir=oracles).oracle is None
    # an oracle for the concept alone is the reference when none matches everything forgotten
    shutil.copytree(tiny_model_dir, oracles / oracle_key(["circle"]) / "model")
    result = store.attack(attack, "circle", random_judge, oracles_dir=oracles)
    assert result.oracle is not None and result.oracle.details["model"] == "without-circle"
    assert [step for step, _ in result.oracle.curve] == [0, 1]
    recorded = [e for e in store.ledger.events() if e.kind == "attack"][-1].payload["result"]
    assert recorded["oracle"]["curve"] == [[0, result.oracle.curve[0][1]], [1, result.oracle.curve[1][1]]]


class _WordModel:
    """Draws striped exactly when its prompt says "magicword": a model whose erasure missed one word."""

    def encode(self, texts):
        from obliviate.models.text import TextEncoding
        flags = torch.tensor([[float("magicword" in t)] for t in texts])
        return TextEncoding(flags[:, None, :], torch.ones(len(texts), 1))

    def sample_encoding(self, encoding, steps, seed, solver):
        return encoding.states[:, 0, 0]


class _FlagJudge:
    def predict(self, flags):
        striped = DEFAULT_ONTOLOGY.index("striped")
        return {d: torch.where(flags > 0, striped if d == "texture" else 0, 0 if d == "texture" else 1).long()
                for d in DEFAULT_ONTOLOGY.domains}


def test_paraphrase_search_finds_the_one_word_the_erasure_missed(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("my {texture} thing, {colour} {shape}\n\n")
    attack = get_attack("paraphrase").from_options({"words": "magicword", "templates_file": str(templates),
                                                    "candidates": "1000", "screen_images": "2", "top": "3", "prompts": "2"})
    space = attack.wordings("striped", WorldPrompts())
    assert {dict(w.words)["texture"] for w in space} >= {"striped", "stripy", "banded", "magicword"}
    assert "my {texture} thing, {colour} {shape}" in {w.template for w in space}
    result = attack.run(_WordModel(), "striped", _FlagJudge(), WorldPrompts(), seed=0)
    assert result.before == 0.0 and result.after == 1.0
    assert all("magicword" in p["prompt"] for p in result.details["best_prompts"])
    assert result.details["screened"] == len(space) and result.details["screened_mean"] == pytest.approx(1 / 10)  # 1 word in 10


@pytest.mark.parametrize("options,message", [
    ({"templates_file": "/nonexistent/t.txt"}, "Cannot read templates_file"),
    ({"top": "0"}, "top must be positive"),
])
def test_paraphrase_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        get_attack("paraphrase").from_options(options)


def test_paraphrase_templates_must_carry_an_attribute(tmp_path):
    for text, message in (("a {thing}", "only the slots"), ("a photo", "names no attribute slot")):
        (tmp_path / "t.txt").write_text(text)
        with pytest.raises(ValueError, match=message):
            get_attack("paraphrase").from_options({"templates_file": str(tmp_path / "t.txt")})
    with pytest.raises(ValueError, match="Extra words name one concept"):
        get_attack("paraphrase").from_options({"words": "x"}).wordings("striped triangle", WorldPrompts())


def test_a_lora_attacker_starts_from_its_seed_whatever_the_process_drew_before(tiny_t2i):
    from obliviate.evaluation.attacks.finetune import attacker_copy
    from obliviate.evaluation.attacks.relearn import RelearnConfig

    def adapter(global_seed, seed):
        torch.manual_seed(global_seed)
        attacked, params = attacker_copy(tiny_t2i, RelearnConfig(lora_rank=2), seed)
        return {name: p.detach().clone() for name, p in params.items()}

    first, second, other = adapter(1, 0), adapter(2, 0), adapter(1, 5)
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed does choose the start
