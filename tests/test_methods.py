import re

import pytest
import torch

from obliviate.engine import RegularizerSpec, Request
from obliviate.methods import UnlearningContext, get_method, list_methods
from obliviate.methods.gradient import GradientMethod
from obliviate.training import Batch, TrainingSession
from obliviate.models.text import TextEncoding
from obliviate.world import WorldPrompts

FAST = {"steps": 2, "forget_images": 2, "sampling_steps": 2, "batch_size": 2}


def context_for(model):
    return UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors())


def run(model, method="esd", options=None, targets=("striped",), anchor=None, seed=0, regularizers=()):
    options = {**FAST, **(options or {})}
    request = Request(tuple(targets), method, options, anchor, tuple(regularizers), seed)
    return get_method(method).from_options(options).unlearn(model, request, context_for(model))


class FixedBatch:
    """Replace the random forget batch by a fixed one, so a loss can be recomputed by hand."""

    def __init__(self, model, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.prompts = ["a striped red triangle", "a striped blue circle"]
        self.anchors = ["a red triangle", "a blue circle"]
        self.clean = torch.randn(2, 3, 16, 16, generator=gen)
        self.noise = torch.randn(2, 3, 16, 16, generator=gen)
        self.t = torch.tensor([100, 700])
        self.noisy = model.scheduler.add_noise(self.clean, self.noise, self.t)

    def __call__(self, session):
        return Batch(self.prompts, self.clean, self.noisy, self.t, self.noise, self.anchors)


@pytest.fixture
def fixed_batch(tiny_t2i, monkeypatch):
    batch = FixedBatch(tiny_t2i)
    monkeypatch.setattr(TrainingSession, "forget_batch", lambda session: batch(session))
    return batch


def predict(model, batch, prompts):
    with torch.no_grad():
        return model.predict(batch.noisy, batch.t, model.encode(prompts))


@pytest.mark.parametrize("eta", [0.0, 1.0, 2.0])
def test_esd_first_loss_matches_its_formula(tiny_t2i, fixed_batch, eta):
    cond = predict(tiny_t2i, fixed_batch, fixed_batch.prompts)
    uncond = predict(tiny_t2i, fixed_batch, [""] * 2)
    # student == teacher at step 0, so ||f(c) - [f(c) - eta (f(c) - f(empty))]||^2 = eta^2 ||f(c) - f(empty)||^2
    expected = (eta ** 2) * (cond - uncond).pow(2).mean()
    result = run(tiny_t2i, "esd", {"negative_guidance": eta, "steps": 1})
    assert result.stats["first_loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-9)


def test_ablation_first_loss_matches_its_formula(tiny_t2i, fixed_batch):
    expected = (predict(tiny_t2i, fixed_batch, fixed_batch.prompts) - predict(tiny_t2i, fixed_batch, fixed_batch.anchors)).pow(2).mean()
    result = run(tiny_t2i, "ablation", {"steps": 1})
    assert result.stats["first_loss"] == pytest.approx(float(expected), rel=1e-4)


def test_ga_first_loss_is_the_negated_denoising_loss(tiny_t2i, fixed_batch):
    target = tiny_t2i.training_target(fixed_batch.clean, fixed_batch.noise, fixed_batch.t)
    expected = -(predict(tiny_t2i, fixed_batch, fixed_batch.prompts) - target).pow(2).mean()
    result = run(tiny_t2i, "ga", {"steps": 1})
    assert result.stats["first_loss"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("variant,allowed", [("x", r"attn2\."), ("x-strict", r"attn2\.(to_k|to_v)\."), ("u", r"^(?!.*attn2\.)")])
def test_esd_variants_change_only_their_parameters(tiny_t2i, variant, allowed):
    result = run(tiny_t2i, "esd", {"variant": variant})
    assert result.edit.deltas, "the request changed nothing"
    assert all(re.search(allowed, name[len("unet."):]) for name in result.edit.deltas), list(result.edit.deltas)[:5]


def test_method_leaves_the_model_as_it_found_it(tiny_t2i):
    before = tiny_t2i.state_tensors()
    run(tiny_t2i, "esd")
    after = tiny_t2i.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_seeded_runs_are_reproducible_and_seeds_matter(minilm):
    from conftest import make_tiny_t2i
    a = run(make_tiny_t2i(minilm), "esd", seed=1).edit.deltas
    b = run(make_tiny_t2i(minilm), "esd", seed=1).edit.deltas
    c = run(make_tiny_t2i(minilm), "esd", seed=2).edit.deltas
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


GRADIENT_METHODS = sorted(n for n in list_methods() if issubclass(get_method(n), GradientMethod))


def test_the_gradient_methods_of_the_issue_are_registered():
    assert {"ga", "esd", "ablation", "fdiv", "salun", "sfron"} <= set(GRADIENT_METHODS)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_every_method_changes_the_model(tiny_t2i, method):
    result = run(tiny_t2i, method, anchor="solid" if method == "ablation" else None)
    changes = [*result.edit.deltas.values(), *(up for up, _ in result.edit.factors.values())]
    assert changes and any(torch.count_nonzero(d) for d in changes)
    assert result.stats["unet_forward_passes"] > 0 and result.stats["unet_backward_passes"] >= FAST["steps"]


def test_fdiv_kl_is_half_the_ablation_loss_and_divergences_behave(tiny_t2i, fixed_batch):
    from obliviate.methods.fdiv import f_divergence
    ablation = run(tiny_t2i, "ablation", {"steps": 1}).stats["first_loss"]
    kl = run(tiny_t2i, "fdiv", {"steps": 1, "divergence": "kl", "gap": "constant", "scale": 1.0}).stats["first_loss"]
    assert kl == pytest.approx(ablation / 2, rel=1e-4)
    gaps = torch.linspace(0, 20, 41, dtype=torch.float64)
    for kind in ("kl", "hellinger", "js", "alpha", "pearson", "jeffreys"):
        values = f_divergence(gaps, kind)
        assert values[0].abs() < 1e-6 and (values.diff() > 0).all(), kind
    assert torch.allclose(f_divergence(gaps, "alpha", 0.5), 4 * f_divergence(gaps, "hellinger"))
    assert torch.allclose(f_divergence(gaps[:5], "alpha", 0.999), f_divergence(gaps[:5], "kl"), rtol=1e-2)
    assert torch.allclose(f_divergence(gaps, "jeffreys"), 2 * f_divergence(gaps, "kl"))
    # Pearson chi^2 bounds KL from above (KL <= log(1 + chi^2)) and grows as e^D
    assert (f_divergence(gaps, "kl") <= torch.log1p(f_divergence(gaps, "pearson")) + 1e-9).all()
    assert f_divergence(torch.tensor([400.0], dtype=torch.float64), "js").item() == pytest.approx(0.6931, abs=1e-3)
    # small gaps: JS ~ D/8 for equal-variance Gaussians
    assert f_divergence(torch.tensor([1e-3], dtype=torch.float64), "js").item() == pytest.approx(1e-3 / 8, rel=1e-2)


def test_fdiv_kernel_gap_is_the_reverse_kernels_mean_gap_over_their_variance(tiny_t2i):
    """D = ||mu_1 - mu_2||^2 / beta_t for DDPM reverse means built from two outputs of the UNet."""
    from types import SimpleNamespace
    method = get_method("fdiv").from_options({"gap": "kernel"})
    g = torch.Generator().manual_seed(0)
    x_t, out_1, out_2 = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3, 100, 500, 950])
    for prediction in ("epsilon", "v_prediction"):
        scheduler = SimpleNamespace(**{k: getattr(tiny_t2i.scheduler, k) for k in ("alphas_cumprod", "betas")},
                                    config=SimpleNamespace(prediction_type=prediction))
        session = SimpleNamespace(model=SimpleNamespace(scheduler=scheduler))
        abar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        beta = scheduler.betas.double()[t].view(-1, 1, 1, 1)

        def mean(output):
            eps = output if prediction == "epsilon" else abar.sqrt() * output + (1 - abar).sqrt() * x_t
            return (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
        expected = ((mean(out_1) - mean(out_2)) ** 2 / beta).flatten(1).sum(1)
        multiplier = method.gap_multiplier(session, t, out_1[0].numel()).double()
        assert torch.allclose(multiplier * (out_1 - out_2).pow(2).flatten(1).sum(1), expected, rtol=1e-4), prediction


@pytest.mark.parametrize("kind", ["hellinger", "js"])  # the two whose f is rescaled to match the closed forms
def test_fdiv_variational_bound_reaches_the_closed_form(kind):
    """A trained discriminator's bound E_P[T] - E_Q[f*(T)] approaches the divergence from below."""
    from obliviate.methods.fdiv import VARIATIONAL, Discriminator, f_divergence
    torch.manual_seed(0)
    shape, gap = (2, 4, 4), 1.0
    shift = torch.full(shape, (gap / 32) ** 0.5)  # P = N(shift, I), Q = N(0, I): D = ||shift||^2 = 1
    f, g = VARIATIONAL[kind], torch.Generator().manual_seed(1)
    discriminator = Discriminator(2)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=3e-3)
    x_t = torch.zeros(256, *shape)
    for _ in range(400):
        p, q = shift + torch.randn(256, *shape, generator=g), torch.randn(256, *shape, generator=g)
        loss = -f.bound(discriminator(p, x_t), discriminator(q, x_t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p, q = shift + torch.randn(20000, *shape, generator=g), torch.randn(20000, *shape, generator=g)
        estimate = float(f.bound(discriminator(p, torch.zeros_like(p)), discriminator(q, torch.zeros_like(q))))
    closed = float(f_divergence(torch.tensor(gap, dtype=torch.float64), kind))
    assert 0.85 * closed < estimate < 1.03 * closed, (estimate, closed)


def test_fdiv_variational_form_trains_the_model_and_covers_only_fs_with_a_conjugate(tiny_t2i):
    result = run(tiny_t2i, "fdiv", {"steps": 2, "form": "variational"})
    assert result.edit.deltas and result.stats["unet_backward_passes"] >= 2
    with pytest.raises(ValueError, match="has only its closed form"):
        get_method("fdiv").from_options({"form": "variational", "divergence": "jeffreys"})


def test_salun_mask_keeps_the_top_fraction_and_masked_weights_do_not_move(tiny_t2i):
    from obliviate.training import top_fraction_mask
    scores = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([[4.0, 0.0], [2.0, 6.0]])}
    mask = top_fraction_mask(scores, 3 / 7)
    assert mask["a"].tolist() == [1, 0, 0] and mask["b"].tolist() == [[1, 0], [0, 1]]
    method = get_method("salun").from_options({**FAST, "mask_ratio": 0.1, "trainable": "xattn"})
    request = Request(("striped",), "salun", {}, None, (), 0)
    result = method.unlearn(tiny_t2i, request, context_for(tiny_t2i))
    for name, m in method.mask.items():
        delta = result.edit.deltas.get(f"unet.{name}")
        if delta is not None:
            assert torch.count_nonzero(delta[m == 0]) == 0, name
    kept = sum(int(m.sum()) for m in method.mask.values()) / sum(m.numel() for m in method.mask.values())
    assert kept == pytest.approx(0.1, abs=0.01)


def test_sfron_mask_is_the_fisher_ratio_and_alternates_steps(tiny_t2i):
    method = get_method("sfron").from_options({**FAST, "forget_every": 2})
    request = Request(("striped",), "sfron", {}, None, (), 0)
    result = method.unlearn(tiny_t2i, request, context_for(tiny_t2i))
    # steps=2, forget every 2nd: forget+retain at step 0, retain at step 1 -> 3 optimizer steps + 2x4 Fisher passes
    assert result.stats["unet_backward_passes"] == 3 + 8
    masked_out = [m for m in method.forget_mask.values() if (m == 0).any()]
    assert masked_out, "a Fisher-ratio mask that keeps everything masks nothing"


@pytest.mark.parametrize("n", [7, 8])
def test_antithetic_timesteps_pair_every_t_with_its_mirror(tiny_t2i, n):
    from types import SimpleNamespace
    from obliviate.training import TrainingSession
    config = get_method("sfron").config_class()
    assert config.antithetic_timesteps  # SFR-on's default, as in the authors' DDPM code
    session = SimpleNamespace(config=config, model=tiny_t2i, generator=torch.Generator().manual_seed(0))
    t = TrainingSession.timesteps(session, n)
    last = tiny_t2i.scheduler.config.num_train_timesteps - 1
    half = -(-n // 2)
    assert len(t) == n and torch.equal(t[half:], last - t[:n - half])
    session.config = get_method("esd").config_class()
    t = TrainingSession.timesteps(session, 8)
    assert not torch.equal(t[4:], last - t[:4])  # plain draws elsewhere


def test_l2sp_penalty_gradient_matches_its_formula(tiny_t2i, fixed_batch):
    from obliviate.regularizers import get_regularizer
    reg = get_regularizer("l2sp")(get_regularizer("l2sp").config_class(weight=10.0))

    class Session:
        params = {n: p for n, p in tiny_t2i.unet.named_parameters() if "attn2.to_k" in n}
    reg.setup(Session)
    with torch.no_grad():
        for p in Session.params.values():
            p.add_(0.01 * torch.randn_like(p))
    for p in Session.params.values():
        p.requires_grad_(True)
        p.grad = None
    reg.penalty(Session).backward()
    count = sum(p.numel() for p in Session.params.values())
    for name, p in Session.params.items():
        expected = 10.0 * 2 * (p.detach() - reg.anchor[name]) / count
        assert torch.allclose(p.grad, expected, atol=1e-9)


def test_regularized_request_drifts_less(minilm):
    from conftest import make_tiny_t2i
    options = {"steps": 6, "learning_rate": 1e-2}
    plain = run(make_tiny_t2i(minilm), "esd", options).edit.deltas
    held = run(make_tiny_t2i(minilm), "esd", options, regularizers=[RegularizerSpec("l2sp", {"weight": 1e5})]).edit.deltas
    norm = lambda d: sum(float(v.pow(2).sum()) for v in d.values())
    assert norm(held) < norm(plain)


def test_unknown_trainable_pattern_is_a_clear_error(tiny_t2i):
    with pytest.raises(ValueError, match="No UNet parameter matches"):
        run(tiny_t2i, "esd", {"trainable": "nothing_like_this"})
    with pytest.raises(ValueError, match="not a valid regex"):
        get_method("esd").from_options({"trainable": "(unclosed"})


def test_text_encoding_cat_and_index():
    enc = TextEncoding(torch.arange(6.0).view(3, 2, 1), torch.ones(3, 2))
    both = TextEncoding.cat([enc, enc[0:1]])
    assert both.states.shape == (4, 2, 1) and torch.equal(both.states[3], enc.states[0])


# --------------------------------------------------------------------------- regularizers
def test_gradproj_keeps_protected_outputs_exactly_and_still_forgets(tiny_t2i):
    from obliviate.regularizers.projection import KV_WEIGHT
    method = get_method("esd").from_options({**FAST, "steps": 3, "learning_rate": 1e-2})
    request = Request(("striped",), "esd", {}, None, (RegularizerSpec("gradproj", {"rank": 16, "prompts": 16}),), 0)
    captured = {}
    from obliviate.regularizers.projection import GradientProjection
    original = GradientProjection.setup

    def setup(self, session):
        original(self, session)
        captured["reg"] = self
    GradientProjection.setup = setup
    try:
        result = method.unlearn(tiny_t2i, request, context_for(tiny_t2i))
    finally:
        GradientProjection.setup = original
    basis = captured["reg"].protected
    kv = {k: v for k, v in result.edit.deltas.items() if KV_WEIGHT.search(k)}
    assert kv, "to_k/to_v did not move at all"
    for name, delta in kv.items():
        assert (delta @ basis).abs().max() < 1e-5 * max(1.0, delta.abs().max()), name  # W p unchanged for p in span(U)
        assert delta.abs().max() > 1e-6


@pytest.mark.parametrize("target_rank", [0, 4])
def test_gradproj_leaves_the_targets_own_directions_free(tiny_t2i, target_rank):
    """With target_rank k, the k top directions of (target token states - anchor token states)
    are orthogonal to the protected subspace, so the method can move along them; with 0 they are
    protected like everything the retained prompts span."""
    from obliviate.regularizers.projection import GradientProjection
    from obliviate.training import aligned_token_states, orthonormal_basis
    captured = {}
    original = GradientProjection.setup

    def setup(self, session):
        original(self, session)
        captured["reg"], captured["session"] = self, session
    GradientProjection.setup = setup
    try:
        options = {"rank": 64, "prompts": 16, "target_rank": target_rank}
        request = Request(("striped",), "esd", {}, None, (RegularizerSpec("gradproj", options),), 0)
        get_method("esd").from_options({**FAST, "steps": 1}).unlearn(tiny_t2i, request, context_for(tiny_t2i))
    finally:
        GradientProjection.setup = original
    session = captured["session"]
    concept, anchor = aligned_token_states(session.model, session.forget_prompts[:16], session.anchor_prompts[:16])
    own = orthonormal_basis((concept - anchor).T, 4, rtol=1e-8)
    overlap = (captured["reg"].protected.double().T @ own).abs().max()
    if target_rank:
        assert overlap < 1e-5
    else:
        assert overlap > 0.1  # the retained prompts' states reach into the target's directions


def test_gradproj_forgotten_share_protects_prompts_of_concepts_forgotten_earlier(tiny_t2i, monkeypatch):
    """Earlier targets' prompts join the protected ones (their erased keys and values stay) only
    when asked, and never name the request's own target."""
    from obliviate.regularizers import get_regularizer, projection
    seen = []
    original = projection.protected_prompts
    monkeypatch.setattr(projection, "protected_prompts", lambda *args: seen.append(original(*args)) or seen[-1])
    for share in (0.0, 0.5):
        options = {"rank": 16, "prompts": 16, "forgotten_share": share}
        request = Request(("triangle",), "esd", {}, None, (RegularizerSpec("gradproj", options),), 0)
        context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped",))
        get_method("esd").from_options({**FAST, "steps": 1}).unlearn(tiny_t2i, request, context)

    def naming(prompts, concept):
        words = WorldPrompts().concept_words((concept,))
        return sum(bool(re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", p)) for p in prompts)
    without, with_share = seen  # 8 siblings' prompts first (they may show striped as another attribute), then the rest
    assert len(without) == len(with_share) == 16
    assert naming(without[8:], "striped") == 0 and naming(with_share[8:], "striped") == 8
    assert naming(with_share[8:], "triangle") == 0
    with pytest.raises(ValueError, match="at most 1"):
        get_regularizer("gradproj").from_options({"sibling_share": 0.6, "forgotten_share": 0.5})


@pytest.mark.parametrize("option", ["supertypes", "unconditional"])
def test_gradproj_keeps_supertype_and_unconditional_prompts_exactly(tiny_t2i, option):
    """With supertypes, prompts naming the supertype of the target (striped: pattern) or of a
    concept forgotten earlier (red: warm) keep their keys and values; with unconditional, the
    empty prompt classifier-free guidance mixes into every image does; without, they move."""
    from obliviate.regularizers.projection import KV_WEIGHT
    from obliviate.training import token_states
    prompts = WorldPrompts()
    kept = {"supertypes": prompts.supertype_prompts("pattern") + prompts.supertype_prompts("warm"), "unconditional": [""]}
    states = token_states(tiny_t2i, kept[option]).float()

    def change(on):
        spec = RegularizerSpec("gradproj", {"rank": 8, "prompts": 8, "target_rank": 0, option: on})
        request = Request(("striped",), "esd", {}, None, (spec,), 0)
        context = UnlearningContext(prompts=prompts, base_weights=tiny_t2i.state_tensors(), forgotten=("red",))
        deltas = get_method("esd").from_options({**FAST, "learning_rate": 1e-2}).unlearn(tiny_t2i, request, context).edit.deltas
        kv = [d for k, d in deltas.items() if KV_WEIGHT.search(k)]
        assert kv and max(d.abs().max() for d in kv) > 1e-6  # the erasure still moves them
        return max(float((d @ states.T).abs().max() / d.abs().max()) for d in kv)
    assert change(True) < 1e-5
    assert change(False) > 1e-3


def test_outproj_keeps_retained_attention_outputs_exactly_and_the_output_projection_still_moves(tiny_t2i, monkeypatch):
    """Each to_out weight's update leaves its protected inputs' outputs as they were (W v = W_start v
    for v in its layer's basis), and the basis holds the protected prompts' attention outputs: the
    empty prompt's, measured again on other noise, lie mostly inside it."""
    from obliviate.regularizers import output_projection
    captured = {}
    original = output_projection.OutputProjection.setup

    def setup(self, session):
        original(self, session)
        captured["reg"], captured["session"] = self, session
    monkeypatch.setattr(output_projection.OutputProjection, "setup", setup)
    spec = RegularizerSpec("outproj", {"rank": 8, "prompts": 8, "draws": 1})
    request = Request(("striped",), "esd", {}, None, (spec,), 0)
    method = get_method("esd").from_options({**FAST, "trainable": "xattn-kvo", "learning_rate": 1e-2})
    deltas = method.unlearn(tiny_t2i, request, context_for(tiny_t2i)).edit.deltas
    bases = captured["reg"].bases
    assert bases and all(name.endswith("attn2.to_out.0.weight") for name in bases)
    for name, basis in bases.items():
        delta = deltas[f"unet.{name}"]
        assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)
        assert delta.abs().max() > 1e-6  # the output projection trains
        assert (delta @ basis).abs().max() < 1e-5 * max(1.0, float(delta.abs().max()))  # and keeps the protected inputs
    session = captured["session"]
    grams = output_projection.attention_output_grams(session, [""] * 2, session.retain_latents, 1)
    for name, basis in bases.items():
        inside = float(torch.trace(basis.double().T @ grams[name] @ basis.double()) / torch.trace(grams[name]))
        assert inside > 0.9, name
    assert not any(k.endswith("to_out.0.bias") for k in deltas)  # xattn-kvo leaves the bias alone


def test_outproj_names_the_trainable_set_it_needs(tiny_t2i):
    from obliviate.regularizers import get_regularizer
    request = Request(("striped",), "esd", {}, None, (RegularizerSpec("outproj", {"rank": 4, "prompts": 4}),), 0)
    with pytest.raises(ValueError, match="trainable=xattn-kvo"):
        get_method("esd").from_options({**FAST, "trainable": "xattn-kv"}).unlearn(tiny_t2i, request, context_for(tiny_t2i))
    with pytest.raises(ValueError, match="at most 1"):
        get_regularizer("outproj").from_options({"sibling_share": 0.9, "forgotten_share": 0.2})


def test_rehearse_adds_the_method_loss_on_earlier_concepts_only(tiny_t2i, monkeypatch):
    """Every step runs the method's loss on the request's prompts and, when an earlier request
    forgot something, on prompts of those earlier concepts (never the request's own target); with
    nothing forgotten before, or at weight 0, the edit is the plain method's, bit for bit."""
    from obliviate.methods.esd import ESD
    calls = []
    original = ESD.loss
    monkeypatch.setattr(ESD, "loss", lambda self, session: calls.append(list(session.forget_prompts)) or original(self, session))
    words = {c: WorldPrompts().concept_words((c,)) for c in ("striped", "dotted", "triangle")}

    def names(prompt, concept):
        return bool(re.search(r"\b(" + "|".join(map(re.escape, words[concept])) + r")\b", prompt))

    def edit(forgotten, *specs):
        calls.clear()
        request = Request(("triangle",), "esd", {}, None, specs, 0)
        context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=forgotten)
        return get_method("esd").from_options(FAST).unlearn(tiny_t2i, request, context).edit.deltas

    plain = edit(("striped", "dotted"))
    assert len(calls) == FAST["steps"]
    rehearsed = edit(("striped", "dotted"), RegularizerSpec("rehearse", {"prompts": 8, "objective": "method"}))
    request_calls, earlier_calls = calls[0::2], calls[1::2]
    assert len(calls) == 2 * FAST["steps"]
    assert all(any(names(p, "triangle") for p in c) for c in request_calls)
    for prompts in earlier_calls:
        assert len(prompts) == 8 and not any(names(p, "triangle") for p in prompts)
        assert all(names(p, "striped") or names(p, "dotted") for p in prompts)
    assert any(not torch.equal(plain[n], rehearsed[n]) for n in plain)
    for forgotten, options in (((), {}), (("striped",), {"weight": 0})):
        alone, unused = edit(forgotten), edit(forgotten, RegularizerSpec("rehearse", options))
        assert alone.keys() == unused.keys() and all(torch.equal(alone[n], unused[n]) for n in alone)
    from obliviate.regularizers import get_regularizer
    with pytest.raises(ValueError, match="prompts must be positive"):
        get_regularizer("rehearse").from_options({"prompts": 0})


def test_rehearse_combined_prompts_show_an_earlier_concept_with_the_target_and_anchor_without_both(tiny_t2i, monkeypatch):
    """With combined=1, every rehearsed striped prompt also shows red (the target) and its anchor
    names neither; blue, red's own domain, never shares a prompt with it. Only with objective=method."""
    from obliviate.methods.esd import ESD
    from obliviate.regularizers import get_regularizer
    calls = []
    original = ESD.loss
    monkeypatch.setattr(ESD, "loss", lambda self, session: calls.append(
        list(zip(session.forget_prompts, session.anchor_prompts))) or original(self, session))
    words = {c: WorldPrompts().concept_words((c,)) for c in ("striped", "blue", "red")}

    def names(prompt, concept):
        return bool(re.search(r"(?<![\w-])(" + "|".join(map(re.escape, words[concept])) + r")(?![\w-])", prompt))

    spec = RegularizerSpec("rehearse", {"prompts": 16, "objective": "method", "combined": 1.0})
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped", "blue"))
    get_method("esd").from_options(FAST).unlearn(tiny_t2i, Request(("red",), "esd", {}, None, (spec,), 0), context)
    rehearsed = calls[1]
    striped = [(p, a) for p, a in rehearsed if not names(p, "blue")]  # blue's rows may be striped too
    assert len(rehearsed) == 16 and striped and len(striped) < 16
    assert all(names(p, "red") and not names(a, "red") and not names(a, "striped") for p, a in striped)
    assert not any(names(p, "red") for p, _ in rehearsed if names(p, "blue"))
    with pytest.raises(ValueError, match="combined needs objective=method"):
        get_regularizer("rehearse").from_options({"combined": 0.5})


def test_partial_prompts_reach_the_method_and_its_rehearsal(tiny_t2i, monkeypatch):
    """``partial_prompts=1``: the request's forget prompts and the earlier concept's rehearsal
    prompts name their concept only ("a stripy" / "a "), and their anchors nothing."""
    from obliviate.methods.esd import ESD
    calls = []
    original = ESD.loss
    monkeypatch.setattr(ESD, "loss", lambda self, session: calls.append(
        list(zip(session.forget_prompts, session.anchor_prompts))) or original(self, session))
    spec = RegularizerSpec("rehearse", {"prompts": 8, "objective": "method"})
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped",))
    get_method("esd").from_options({**FAST, "partial_prompts": 1.0}).unlearn(
        tiny_t2i, Request(("red",), "esd", {}, None, (spec,), 0), context)
    request_pairs, rehearsed = calls[0], calls[1]
    for pairs, concept in ((request_pairs, "red"), (rehearsed, "striped")):
        words = WorldPrompts().concept_words((concept,))
        assert all(p.split()[0] == "a" and " ".join(p.split()[1:]) in words and a == "a " for p, a in pairs), pairs


def test_swap_anchors_put_a_retained_concept_in_the_targets_place_in_method_and_rehearsal(tiny_t2i, monkeypatch):
    """``swap_anchors``: dotted's forget prompts and striped's rehearsal prompts (forgotten earlier)
    are anchored with solid, gradient or checkered in the concept's place; never with the other
    forgotten texture, never with none (shapes-t2i draws dotted when no texture is named)."""
    from obliviate.methods.esd import ESD
    calls = []
    original = ESD.loss
    monkeypatch.setattr(ESD, "loss", lambda self, session: calls.append(
        list(zip(session.forget_prompts, session.anchor_prompts))) or original(self, session))
    spec = RegularizerSpec("rehearse", {"prompts": 8, "objective": "method"})
    prompts = WorldPrompts()
    context = UnlearningContext(prompts=prompts, base_weights=tiny_t2i.state_tensors(), forgotten=("striped",))
    get_method("esd").from_options({**FAST, "swap_anchors": True}).unlearn(
        tiny_t2i, Request(("dotted",), "esd", {}, None, (spec,), 0), context)

    def textures(text):
        return {c for c in prompts.ontology.names("texture")
                if any(re.search(rf"\b{re.escape(w)}\b", text) for w in prompts.concept_words((c,)))}
    for pairs, concept in ((calls[0], "dotted"), (calls[1], "striped")):
        assert all(textures(p) == {concept} for p, _ in pairs)
        swapped = [textures(a) for _, a in pairs]
        assert all(len(t) == 1 and t <= {"solid", "gradient", "checkered"} for t in swapped), pairs
        assert len(set.union(*swapped)) == 3  # a random one each time, not one fixed replacement


def test_rehearse_keep_holds_earlier_concepts_predictions_at_their_start(tiny_t2i, monkeypatch):
    """``objective=keep``: the penalty is zero before the first step (the start model's own
    predictions, recorded at setup, on prompts of the earlier concepts only) and grows once the
    weights move."""
    from obliviate.regularizers.rehearsal import Rehearsal
    seen = []
    original = Rehearsal.penalty
    monkeypatch.setattr(Rehearsal, "penalty", lambda self, session: seen.append((original(self, session), self.kept.prompts)) or seen[-1][0])
    request = Request(("triangle",), "esd", {}, None, (RegularizerSpec("rehearse", {"prompts": 4, "weight": 2.0}),), 0)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped",))
    get_method("esd").from_options({**FAST, "steps": 3, "learning_rate": 1e-2}).unlearn(tiny_t2i, request, context)
    (first, prompts), *later = seen
    assert len(prompts) == 4 * 4
    assert not any(w in p for p in prompts for w in WorldPrompts().concept_words(("triangle",)))
    assert all(any(w in p for w in WorldPrompts().concept_words(("striped",))) for p in prompts)
    assert first.item() == pytest.approx(0.0, abs=1e-10)
    assert all(value.item() > 1e-8 for value, _ in later)


@pytest.mark.parametrize("avoid_forgotten", [True, False])
def test_forget_prompts_leave_out_concepts_forgotten_earlier(tiny_t2i, monkeypatch, avoid_forgotten):
    """The teacher predicts an earlier-forgotten concept erased, and ESD's target mirrors how
    that erasure differs between prompt and anchor: with avoid_forgotten no forget prompt shows
    one; without it (the default) they may."""
    drawn = []
    forget_pairs = GradientMethod.forget_pairs

    def recorded(self, session, n):
        drawn.extend(forget_pairs(self, session, n))
        return drawn

    monkeypatch.setattr(GradientMethod, "forget_pairs", recorded)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped", "blue"))
    method = get_method("esd").from_options({**FAST, "steps": 1, "avoid_forgotten": avoid_forgotten})
    method.unlearn(tiny_t2i, Request(("triangle",), "esd", {}, None, (), 0), context)
    onto = context.prompts.ontology
    shows = [p.labels[2] == onto.index("striped") or p.labels[1] == onto.index("blue") for p in drawn]
    assert len(drawn) == 64 and any(shows) is not avoid_forgotten


@pytest.mark.parametrize("method", ["salun", "safegen"])
def test_random_anchors_are_their_own_prompts_with_the_target_swapped(tiny_t2i, monkeypatch, method):
    """Forget prompt i and anchor i come from one drawn pair: the same row and template, the
    target swapped for a random retained concept (SalUn's anchors once came from a second draw)."""
    drawn, trained = [], {}
    original = WorldPrompts.random_anchor_pairs
    monkeypatch.setattr(WorldPrompts, "random_anchor_pairs", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    setup = get_method(method).setup

    def recorded(self, session):
        trained["pairs"] = list(zip(session.forget_prompts, session.anchor_prompts))
        setup(self, session)
    monkeypatch.setattr(get_method(method), "setup", recorded)
    run(tiny_t2i, method, {"steps": 1})
    assert len(drawn) == 1 and trained["pairs"] == [(p.target, p.anchor) for p in drawn[0]]


@pytest.mark.parametrize("images", ["start", "pretrained"])
def test_rehearse_draws_earlier_concepts_with_the_model_it_is_told(tiny_t2i, monkeypatch, images):
    """The images the earlier concepts are rehearsed on come from the model the request starts
    from (which has them erased) or, with images=pretrained, from the pretrained weights (which
    still draw them); either way the model is put back bit for bit."""
    from obliviate.models.t2i import T2IModel
    from obliviate.regularizers.rehearsal import Rehearsal
    pretrained = tiny_t2i.state_tensors()
    with torch.no_grad():  # the current model: an earlier request moved its cross-attention
        for name, p in tiny_t2i.unet.named_parameters():
            if "attn2.to_v" in name:
                p.add_(0.5 * torch.randn_like(p))
    current, drawn_by, in_setup = tiny_t2i.state_tensors(), [], []
    sample = T2IModel.sample
    monkeypatch.setattr(T2IModel, "sample", lambda self, *a, **k: drawn_by.append(self.state_tensors()) or sample(self, *a, **k))
    setup = Rehearsal.setup
    monkeypatch.setattr(Rehearsal, "setup", lambda self, session: in_setup.append(len(drawn_by)) or setup(self, session))
    spec = RegularizerSpec("rehearse", {"prompts": 4, "objective": "method", "images": images})
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=pretrained, forgotten=("striped",))
    get_method("esd").from_options({**FAST, "steps": 1}).unlearn(tiny_t2i, Request(("triangle",), "esd", {}, None, (spec,), 0), context)
    weights = drawn_by[in_setup[0]]  # the first drawing inside the rehearsal's setup
    expected = pretrained if images == "pretrained" else current
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert all(torch.equal(v, current[k]) for k, v in tiny_t2i.state_tensors().items())
    from obliviate.regularizers import get_regularizer
    with pytest.raises(ValueError, match="not one of 'start', 'pretrained'"):
        get_regularizer("rehearse").from_options({"images": "base"})


def test_rehearse_keep_under_merge_keeps_the_weights_training_starts_from(tiny_t2i, monkeypatch):
    """``merge`` (independent) trains each request from the pretrained weights: ``keep`` records
    their predictions, so this request's task vector leaves the earlier concepts as the
    pretrained model has them, not as the current (erased) model does."""
    from obliviate.regularizers.rehearsal import Rehearsal
    first = []
    original = Rehearsal.penalty
    monkeypatch.setattr(Rehearsal, "penalty", lambda self, session: first.append(original(self, session)) or first[-1])
    pretrained = {k: v.clone() for k, v in tiny_t2i.state_tensors().items()}
    with torch.no_grad():  # the current model: an earlier request moved its cross-attention
        for name, p in tiny_t2i.unet.named_parameters():
            if "attn2.to_v" in name:
                p.add_(0.5 * torch.randn_like(p))
    current = {k: v.clone() for k, v in tiny_t2i.state_tensors().items()}
    request = Request(("triangle",), "esd", {}, None, (RegularizerSpec("rehearse", {"prompts": 4}),
                                                       RegularizerSpec("merge", {"strategy": "uniform"})), 0)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=pretrained, forgotten=("striped",))
    get_method("esd").from_options({**FAST, "steps": 2}).unlearn(tiny_t2i, request, context)
    assert first[0].item() == pytest.approx(0.0, abs=1e-10)
    assert all(torch.equal(v, current[k]) for k, v in tiny_t2i.state_tensors().items())  # the model is put back


def test_preserve_holds_retained_predictions_at_their_start(tiny_t2i, monkeypatch):
    """Its prompts show neither the target nor an earlier-forgotten concept; the penalty is zero
    before the first step; and the edit moves the recorded retained predictions less than the
    same request without it does."""
    from obliviate.regularizers.preservation import Preservation
    made, seen = [], []
    setup, penalty = Preservation.setup, Preservation.penalty
    monkeypatch.setattr(Preservation, "setup", lambda self, session: made.append(self) or setup(self, session))
    monkeypatch.setattr(Preservation, "penalty", lambda self, session: seen.append(penalty(self, session)) or seen[-1])
    start = {k: v.clone() for k, v in tiny_t2i.state_tensors().items()}
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=start, forgotten=("striped",))
    # a small rate: at 1e-2 Adam's sign-like steps overshoot a penalty that is zero at the start
    esd = get_method("esd").from_options({**FAST, "steps": 8, "learning_rate": 1e-3})

    def edit(*regularizers):
        return esd.unlearn(tiny_t2i, Request(("triangle",), "esd", {}, None, regularizers, 0), context).edit

    preserved = edit(RegularizerSpec("preserve", {"prompts": 4, "weight": 10.0}))
    plain = edit()
    kept = made[0].kept
    words = WorldPrompts().concept_words(("triangle", "striped"))
    assert not any(re.search(rf"\b{re.escape(w)}\b", p) for p in kept.prompts for w in words)
    assert seen[0].item() == pytest.approx(0.0, abs=1e-10) and seen[-1].item() > 1e-8

    def drift(result):
        tiny_t2i.load_state_tensors(result.apply(start))
        with torch.no_grad():
            moved = tiny_t2i.predict(kept.noisy, kept.t, tiny_t2i.encode(kept.prompts)) - kept.kept
        tiny_t2i.load_state_tensors(start)
        return moved.pow(2).mean().item()

    assert drift(preserved) < 0.25 * drift(plain)


def kept_by_preserve(model, monkeypatch, forgotten: tuple[str, ...], target: str, options: dict):
    """What ``preserve`` with ``options`` records in one step of ``target``'s ESD request."""
    from obliviate.regularizers.preservation import Preservation
    made = []
    setup = Preservation.setup
    monkeypatch.setattr(Preservation, "setup", lambda self, session: made.append(self) or setup(self, session))
    start = {k: v.clone() for k, v in model.state_tensors().items()}
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=start, forgotten=forgotten)
    request = Request((target,), "esd", {}, None, (RegularizerSpec("preserve", options),), 0)
    get_method("esd").from_options({**FAST, "steps": 1}).unlearn(model, request, context)
    return made[0].kept


def test_preserve_supertypes_holds_supertype_prompts_to_a_retained_members_predictions(tiny_t2i, monkeypatch):
    """``supertypes`` adds prompts naming the supertype of the target and of an earlier-forgotten
    concept in a retained member's place, whose recorded predictions are the start model's for
    that member's prompt on its images."""
    kept = kept_by_preserve(tiny_t2i, monkeypatch, ("striped",), "triangle", {"prompts": 4, "supertypes": 2})
    # four retained prompts held to themselves, then pattern and polygon in place of a retained member
    assert kept.prompts[:4] == kept.references[:4] and len(set(kept.prompts)) == 6
    assert re.search(r"\bpattern\b", kept.prompts[4]) and re.search(r"\bpolygons?\b", kept.prompts[5])
    assert all(kept.references[i] != kept.prompts[i] for i in (4, 5))
    with torch.no_grad():
        member = tiny_t2i.predict(kept.noisy[:6], kept.t[:6], tiny_t2i.encode(kept.references[:6]))
    assert torch.allclose(member, kept.kept[:6], atol=1e-5)


def test_preserve_unnamed_holds_prompts_without_a_forgotten_domain_to_a_retained_concepts_predictions(tiny_t2i, monkeypatch):
    """``unnamed`` adds prompts that leave out the domain of the target (dotted: texture) and of
    an earlier-forgotten concept (red: colour), held to the start model's predictions for the
    same prompt naming a retained concept there, on that prompt's images."""
    kept = kept_by_preserve(tiny_t2i, monkeypatch, ("red",), "dotted", {"prompts": 4, "unnamed": 2})
    assert kept.prompts[:4] == kept.references[:4] and len(set(kept.prompts)) == 6
    for prompt, reference in zip(kept.prompts[4:6], kept.references[4:6]):  # the reference names one more concept
        assert set(prompt.split()) < set(reference.split()), (prompt, reference)
    with torch.no_grad():
        named = tiny_t2i.predict(kept.noisy[4:6], kept.t[4:6], tiny_t2i.encode(kept.references[4:6]))
    assert torch.allclose(named, kept.kept[4:6], atol=1e-5)


def test_selft_moves_only_the_selected_fraction(tiny_t2i):
    request = Request(("striped",), "esd", {}, None, (RegularizerSpec("selft", {"fraction": 0.05}),), 0)
    result = get_method("esd").from_options({**FAST, "steps": 3}).unlearn(tiny_t2i, request, context_for(tiny_t2i))
    moved = sum(int(torch.count_nonzero(d)) for d in result.edit.deltas.values())
    total = sum(p.numel() for n, p in tiny_t2i.unet.named_parameters() if "attn2." in n)
    assert 0 < moved <= 0.05 * total + 1


def test_ties_merge_follows_its_definition():
    from obliviate.regularizers.merge import MergeConfig, merge_vectors, ties_merge
    vectors = torch.tensor([[3.0, -1.0, 0.1, 2.0], [1.0, 2.0, -0.2, -4.0]])
    # top-50% per task: [3, 2] of task 0 and [2, -4] of task 1; signs: +, +, 0, - ; agreeing means
    assert ties_merge(vectors, 0.5).tolist() == [3.0, 2.0, 0.0, -4.0]
    assert merge_vectors(vectors, MergeConfig(strategy="uniform")).tolist() == pytest.approx([2.0, 0.5, -0.05, -1.0])
    assert merge_vectors(vectors, MergeConfig(strategy="task_arithmetic", scale=0.5)).tolist() == pytest.approx([2.0, 0.5, -0.05, -1.0])


def test_merge_and_ewc_keep_state_across_requests(tmp_path, tiny_model_dir):
    from obliviate.engine import Store
    store = Store.init(tmp_path / "s", tiny_model_dir)
    fast = {k: str(v) for k, v in FAST.items()}
    for target in ("striped", "dotted"):
        store.add_request([target], "esd", fast, regularizers=(RegularizerSpec("merge", {"strategy": "uniform"}),
                                                               RegularizerSpec("ewc", {"batches": "1"})))
    store.apply(limit=1)
    one = store.method_state()
    store.apply()
    two = store.method_state()
    assert any(k.startswith("reg.merge/tasks.0.") for k in one) and any(k.startswith("reg.merge/tasks.1.") for k in two)
    fisher = [k for k in two if k.startswith("reg.ewc/fisher.")]
    assert fisher and all(float((two[k] - one[k]).min()) >= 0 for k in fisher)  # accumulated, never shrinks
    # uniform merging: the model after two requests is base + mean of the two task vectors
    base, current = store.replay(0), store.load_model().state_tensors()
    for key in [k for k in two if k.startswith("reg.merge/tasks.0.")][:3]:
        name = "unet." + key[len("reg.merge/tasks.0."):]
        task0, task1 = two[key], two[key.replace("tasks.0.", "tasks.1.")]
        assert torch.allclose(current[name] - base[name], (task0 + task1) / 2, atol=1e-6)


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_independent_merge_trains_each_task_vector_from_the_pretrained_weights(tmp_path, tiny_model_dir, mode):
    """CUIG's property: a request's task vector does not depend on the requests before it."""
    from obliviate.engine import Store
    fast = {k: str(v) for k, v in FAST.items()}
    merge = (RegularizerSpec("merge", {"strategy": "uniform", "mode": mode}),)
    alone, after = Store.init(tmp_path / "alone", tiny_model_dir), Store.init(tmp_path / "after", tiny_model_dir)
    alone.add_request(["dotted"], "esd", fast, regularizers=merge)
    after.add_request(["striped"], "esd", fast, regularizers=merge)
    after.add_request(["dotted"], "esd", fast, regularizers=merge)
    alone.apply(), after.apply()
    own, second = alone.method_state(), after.method_state()
    keys = [k for k in own if k.startswith("reg.merge/tasks.0.")]
    same = all(torch.equal(own[k], second[k.replace("tasks.0.", "tasks.1.")]) for k in keys)
    assert same == (mode == "independent")
    # the store's model stays base + the merge of the task vectors, trained from wherever
    base, current = after.replay(0), after.load_model().state_tensors()
    for key in keys[:3]:
        name = "unet." + key[len("reg.merge/tasks.0."):]
        assert torch.allclose(current[name] - base[name], (second[key] + second[key.replace("tasks.0.", "tasks.1.")]) / 2, atol=1e-6)


def test_ewc_penalty_gradient_matches_its_formula(tiny_t2i):
    from obliviate.regularizers.ewc import EWC, EWCConfig
    reg = EWC(EWCConfig(weight=3.0))
    params = {n: p for n, p in tiny_t2i.unet.named_parameters() if "attn2.to_v" in n}
    reg.fisher = {n: torch.rand_like(p) for n, p in params.items()}
    reg.start = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None

    class Session:
        pass
    Session.params = params
    reg.penalty(Session).backward()
    for n, p in params.items():
        assert torch.allclose(p.grad, 3.0 * reg.fisher[n] * (p.detach() - reg.start[n]), atol=1e-7)


def test_fgoriu_protects_its_subspaces_and_adapts_them_across_requests(tmp_path, tiny_model_dir):
    from obliviate.engine import Store
    from obliviate.regularizers.orthogonal import FGOrIU
    captured = []
    original = FGOrIU.setup

    def setup(self, session):
        original(self, session)
        captured.append(self)
    FGOrIU.setup = setup
    try:
        store = Store.init(tmp_path / "s", tiny_model_dir)
        options = {"remain_rank": "24", "min_remain_rank": "8", "contract": "0.5", "prompts": "16", "forget_rank": "3"}
        for target in ("striped", "circle"):
            store.add_request([target], "esd", {**{k: str(v) for k, v in FAST.items()}, "steps": "3", "learning_rate": "0.01"},
                              regularizers=(RegularizerSpec("fgoriu", options),))
        store.apply()
    finally:
        FGOrIU.setup = original
    first, second = captured
    assert first.remain.shape[1] == 24 and second.remain.shape[1] == 12  # the remaining subspace contracts
    assert second.forget.shape[1] == first.forget.shape[1] + 3  # forgetting subspaces merge
    assert torch.allclose(first.forget.T @ second.forget @ (second.forget.T @ first.forget), torch.eye(3, dtype=torch.float64), atol=1e-6)
    # request 2's update leaves retained directions and request 1's forgotten directions untouched
    edit = store.replay(2)
    before = store.replay(1)
    for name in (k for k in edit if "attn2.to_k.weight" in k or "attn2.to_v.weight" in k):
        delta = (edit[name] - before[name]).double()
        assert (delta @ second.protected.double()).abs().max() < 1e-5 * max(1.0, float(delta.abs().max()))
    state = store.method_state()
    assert int(state["reg.fgoriu/requests"]) == 2


def test_esd_anchor_guide_negates_only_the_target_direction(tiny_t2i, fixed_batch):
    cond = predict(tiny_t2i, fixed_batch, fixed_batch.prompts)
    anchor = predict(tiny_t2i, fixed_batch, fixed_batch.anchors)
    expected = 4.0 * (cond - anchor).pow(2).mean()  # eta = 2 against the anchor prediction
    result = run(tiny_t2i, "esd", {"guide": "anchor", "steps": 1})
    assert result.stats["first_loss"] == pytest.approx(float(expected), rel=1e-4)


# --------------------------------------------------------------------------- safegen
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_safegen_target_denoises_the_noisy_image_into_the_substitute(tiny_t2i, prediction_type):
    """Whatever x_t came from, the target's implied clean image is the substitute x'_0."""
    import copy
    from diffusers import DDPMScheduler
    from obliviate.methods.safegen import substitute_target
    model = copy.copy(tiny_t2i)
    model.scheduler = DDPMScheduler.from_config(tiny_t2i.scheduler.config, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    original, substitute, noise = (torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 100, 500, 999])
    noisy = model.scheduler.add_noise(original, noise, t)
    target = substitute_target(model, noisy, substitute, t)
    abar = model.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        implied = (noisy - (1 - abar).sqrt() * target) / abar.sqrt()
    else:
        implied = abar.sqrt() * noisy - (1 - abar).sqrt() * target
    assert torch.allclose(implied, substitute, atol=1e-6)
    # with the original as its own substitute the target is the plain denoising target
    assert torch.allclose(substitute_target(model, noisy, original, t), model.training_target(original, noise, t), atol=1e-6)


def test_safegen_pairs_share_noise_and_train_outside_cross_attention(tiny_t2i, monkeypatch):
    """The anchors' images start from the targets' noise (with the target as its own anchor the
    pairs are equal); the edit touches no cross-attention weight; rehearsing its loss on other
    images is refused, not silently mispaired."""
    from obliviate.methods.safegen import SafeGen
    drawn = {}
    original = SafeGen.draw_forget_latents

    def draw(self, session):
        session.anchor_prompts = list(session.forget_prompts)
        out = original(self, session)
        drawn["pairs"] = (self.originals, self.substitutes)
        return out
    monkeypatch.setattr(SafeGen, "draw_forget_latents", draw)
    result = run(tiny_t2i, "safegen", {"learning_rate": 1e-3})
    assert torch.equal(*drawn["pairs"])
    assert result.edit.deltas and all("attn2." not in k for k in result.edit.deltas)
    assert any(d.abs().max() > 0 for d in result.edit.deltas.values())
    monkeypatch.undo()
    request = Request(("triangle",), "safegen", {}, None, (RegularizerSpec("rehearse", {"objective": "method"}),), 0)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors(), forgotten=("striped",))
    with pytest.raises(ValueError, match="has no pairs"):
        get_method("safegen").from_options(FAST).unlearn(tiny_t2i, request, context)
