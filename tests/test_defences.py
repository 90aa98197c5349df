"""Defences against relearning and prompt attacks (meta, resalign, adversarial with AEGIS's
rectified retain term): each one's gradient against a brute-force or finite-difference
reference, their data kept apart from the evaluation's, and their place in the composition
contract."""

import numpy as np
import pytest
import torch

from obliviate.engine import RegularizerSpec, Request
from obliviate.evaluation.attacks import get_attack
from obliviate.methods import UnlearningContext, get_method
from obliviate.methods import gradient as gradient_loop
from obliviate.regularizers import get_regularizer
from obliviate.training import (ScratchModule, first_order_meta_gradient, linear_surrogate, moreau_hypergradient,
                                rectified_retain_gradient)
from obliviate.world import WorldPrompts

FAST = {"steps": 2, "forget_images": 2, "sampling_steps": 2, "batch_size": 2, "learning_rate": 1e-2}
DEFENCES = {"meta": {"learning_rates": (1e-3,), "steps": (1,)},
            "resalign": {"gammas": (1e-3,), "prox_steps": 2, "iterations": 1},
            "adversarial": {"inner_steps": 2}}


class Vector(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.u = torch.nn.Parameter(torch.as_tensor(value, dtype=torch.float64))


def _quadratic(seed, n=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=g, dtype=torch.float64)
    return scale * (root @ root.T / n + torch.eye(n, dtype=torch.float64)), torch.randn(n, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- the functional core
@pytest.mark.parametrize("seed", range(3))
def test_first_order_meta_gradient_is_the_outer_gradient_after_the_simulated_steps(seed):
    a, c = _quadratic(seed)
    d = torch.randn(5, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    theta = torch.randn(5, generator=torch.Generator().manual_seed(seed + 20), dtype=torch.float64)
    scratch = ScratchModule(Vector(torch.zeros(5)))
    u = scratch.parameters["u"]
    lr, steps = 0.05, 3
    got = first_order_meta_gradient(scratch, {"u": theta}, ["u"], lambda: 0.5 * u @ a @ u - c @ u,
                                     lambda: (u - d).pow(4).sum(), ["u"], steps, "sgd", lr)["u"]
    brute = theta.clone()
    for _ in range(steps):  # SGD by hand on the same quadratic
        brute = brute - lr * (a @ brute - c)
    torch.testing.assert_close(got, 4 * (brute - d) ** 3)


@pytest.mark.parametrize("seed", range(3))
def test_moreau_hypergradient_is_the_derivative_of_the_outer_loss_through_the_proximal_point(seed):
    """L_FT(u) = u'Au/2 - c'u, so theta*(theta) = (A + I/gamma)^-1 (c + theta/gamma) in closed form;
    the hypergradient must equal the finite-difference derivative of L_outer(theta*(theta))."""
    a, c = _quadratic(seed, scale=0.5)
    d = torch.randn(5, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    theta = torch.randn(5, generator=torch.Generator().manual_seed(seed + 20), dtype=torch.float64)
    gamma = 0.2
    outer = lambda v: (v - d).pow(3).sum()  # noqa: E731
    optimum = lambda th: torch.linalg.solve(a + torch.eye(5, dtype=torch.float64) / gamma, c + th / gamma)  # noqa: E731
    reference = torch.stack([(outer(optimum(theta + 1e-6 * e)) - outer(optimum(theta - 1e-6 * e))) / 2e-6
                             for e in torch.eye(5, dtype=torch.float64)])
    scratch = ScratchModule(Vector(torch.zeros(5)))
    u = scratch.parameters["u"]
    got = moreau_hypergradient(scratch, {"u": theta}, ["u"], lambda: 0.5 * u @ a @ u - c @ u, lambda: outer(u),
                               gamma, steps=200, learning_rate=gamma / 2, iterations=60)["u"]
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
    # without Richardson iterations it is the plain gradient at theta*, which is not the derivative
    plain = moreau_hypergradient(scratch, {"u": theta}, ["u"], lambda: 0.5 * u @ a @ u - c @ u, lambda: outer(u),
                                 gamma, steps=200, learning_rate=gamma / 2, iterations=0)["u"]
    assert not torch.allclose(plain, reference, rtol=1e-2)


def test_linear_surrogate_is_zero_with_the_given_gradient():
    params = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(4))}
    grads = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    value = linear_surrogate(params, grads)
    value.backward()
    assert float(value.detach()) == 0.0
    assert all(torch.equal(params[n].grad, grads[n]) for n in params)


def _inner(a: dict, b: dict) -> float:
    return sum(float((a[n].double() * b[n].double()).sum()) for n in a)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("omega", [0.0, 0.3, 1.0])
def test_a_conflicting_retain_gradient_is_rescaled_so_the_step_stops_opposing_it(seed, omega):
    g = torch.Generator().manual_seed(seed)
    erase = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    retain = {n: torch.randn(t.shape, generator=g) for n, t in erase.items()}
    if _inner(erase, retain) > 0:
        retain = {n: -t for n, t in retain.items()}  # make them conflict
    got = rectified_retain_gradient(erase, retain, omega)
    step = {n: erase[n] + got[n] for n in erase}
    # still along g_r, not against it, and the step's component on g_r is (1 - omega) of the erasure's
    scale = _inner(got, retain) / _inner(retain, retain)
    assert scale >= 0 and all(torch.allclose(got[n], scale * retain[n], atol=1e-6) for n in retain)
    assert _inner(step, retain) == pytest.approx((1 - omega) * _inner(erase, retain), rel=1e-5, abs=1e-6)
    # without a conflict it is left as it is
    agreeing = {n: -t for n, t in retain.items()}
    assert rectified_retain_gradient(erase, agreeing, omega) is agreeing
    with pytest.raises(ValueError, match="omega"):
        rectified_retain_gradient(erase, retain, 1.5)


def test_scratch_copy_leaves_the_original_and_its_hooks_alone():
    module = torch.nn.Linear(3, 2)
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    before = {n: p.clone() for n, p in module.named_parameters()}
    scratch = ScratchModule(module)
    scratch.load({"weight": torch.zeros(2, 3)})
    scratch.module(torch.randn(1, 3))
    assert calls == [] and all(torch.equal(before[n], p) for n, p in module.named_parameters())
    module(torch.randn(1, 3))
    assert calls == [1]


# --------------------------------------------------------------------------- inside a request
def _session_with(minilm, name, monkeypatch, method="esd"):
    """A real request on the tiny UNet with one defence; returns the regularizer and session as
    they were when the loop first asked for the defence's penalty."""
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    captured = {}
    original = get_regularizer(name).penalty

    def spy(self, session):
        out = original(self, session)
        captured.setdefault("first", (self, session, out))
        return out
    monkeypatch.setattr(get_regularizer(name), "penalty", spy)
    request = Request(("striped",), method, FAST, None, (RegularizerSpec(name, DEFENCES[name]),), 0)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors())
    result = get_method(method).from_options(FAST).unlearn(model, request, context)
    return captured["first"], result


@pytest.mark.parametrize("name", sorted(DEFENCES))
def test_each_defence_runs_in_a_request_and_changes_the_edit(minilm, name, monkeypatch):
    (_, _, first), result = _session_with(minilm, name, monkeypatch)
    assert first is not None and first.requires_grad
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    plain = get_method("esd").from_options(FAST).unlearn(
        model, Request(("striped",), "esd", FAST, None, (), 0),
        UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors()))
    assert any(not torch.equal(result.edit.deltas[k], plain.edit.deltas[k]) for k in plain.edit.deltas)
    assert result.stats["unet_backward_passes"] > plain.stats["unet_backward_passes"]


def test_adversarial_penalty_gradient_matches_finite_differences_and_the_adversary_revives(minilm, monkeypatch):
    (reg, session, _), _ = _session_with(minilm, "adversarial", monkeypatch)
    torch.manual_seed(0)
    batch = session.concept_batch()
    prompt, anchor = session.encode(batch.prompts), session.encode(batch.anchors)
    with torch.no_grad():
        revived = session.frozen.predict(batch.noisy, batch.t, prompt)
        erased = session.frozen.predict(batch.noisy, batch.t, anchor)

    def inner() -> float:
        with torch.no_grad():
            return float((session.model.predict(batch.noisy, batch.t, prompt.with_prefix(reg.prefix)) - revived).pow(2).mean())
    before = inner()
    reg.optimizer = torch.optim.Adam([reg.prefix], lr=1e-4)  # small steps: a decrease is guaranteed to first order
    reg.attack(session, batch, prompt, revived)
    assert inner() < before  # the inner attacker moves the model towards drawing the target

    params = {n: p.requires_grad_(True) for n, p in session.params.items() if p.dim() == 2}
    attacked = prompt.with_prefix(reg.prefix.detach())

    def outer() -> torch.Tensor:
        return (session.model.predict(batch.noisy, batch.t, attacked) - erased).pow(2).mean()
    grads = torch.autograd.grad(outer(), list(params.values()))
    direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(params.items())}
    analytic = sum(float((g * direction[n]).sum()) for g, n in zip(grads, params))
    eps = 1e-3
    with torch.no_grad():
        for n, p in params.items():
            p.add_(eps * direction[n])
        plus = float(outer())
        for n, p in params.items():
            p.sub_(2 * eps * direction[n])
        minus = float(outer())
        for n, p in params.items():
            p.add_(eps * direction[n])
    assert abs((plus - minus) / (2 * eps) - analytic) <= 0.02 * abs(analytic) + 1e-6


def test_meta_gradient_in_a_request_is_the_outer_gradient_at_the_fine_tuned_copy(minilm, monkeypatch):
    """The penalty's gradient equals a brute-force rerun: the same weights fine-tuned by hand on
    the same batch with the same optimizer, then the outer loss differentiated."""
    (reg, session, _), _ = _session_with(minilm, "meta", monkeypatch)

    def streams():
        return session.rng.bit_generator.state, session.generator.get_state()

    def restore(state):
        session.rng.bit_generator.state, _ = state
        session.generator.set_state(state[1])
    start = streams()
    attacker, outer = reg.attacker_loss(session), reg.outer_loss(session)
    drawn = streams()
    weights = reg.current_weights(session)
    restore(start)
    got = first_order_meta_gradient(reg.scratch, weights, reg.attacker_params, reg.attacker_loss(session),
                                    reg.outer_loss(session), list(session.params), 1, "adam", 1e-3)
    restore(drawn)
    # by hand
    reg.scratch.load(weights)
    trained = reg.scratch.train_only(reg.attacker_params)
    optimizer = torch.optim.Adam(trained, lr=1e-3)
    optimizer.zero_grad()
    attacker().backward()
    optimizer.step()
    params = reg.scratch.train_only(list(session.params))
    expected = torch.autograd.grad(outer(), params, allow_unused=True)
    for (n, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("data", ["renders", "model"])
def test_an_attack_never_fine_tunes_on_the_defences_images(minilm, monkeypatch, tiny_model_dir, data):
    """The simulated attacker's images are the frozen model's drawings at the start of the
    request; the relearning attack's, rendered or drawn by a model (here the very model the
    request started from), with any seed (the request's too), are none of them."""
    from obliviate.evaluation.attacks.base import concept_rows
    from obliviate.evaluation.attacks.finetune import attack_images
    from obliviate.evaluation.attacks.relearn import RelearnConfig
    (reg, session, _), _ = _session_with(minilm, "meta", monkeypatch)
    settings = RelearnConfig(sampling_steps=2, data="renders" if data == "renders" else str(tiny_model_dir))
    defence_images = session.concept_latents
    size = defence_images.shape[-2:]
    defence_images = defence_images.flatten(1)
    for seed in (0, session.request.seed, 1, 7):
        labels, texts = concept_rows(session.prompts, "striped", 16, seed)
        images = torch.nn.functional.adaptive_avg_pool2d(attack_images(settings, session.prompts, labels, texts, seed), size)
        attack_latents = session.model.to_latents(images).flatten(1)
        distance = torch.cdist(attack_latents, defence_images.to(attack_latents))
        assert float(distance.min()) > 1e-3


def test_a_data_model_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="neither a zoo model"):
        get_attack("relearn").from_options({"data": "no-such-model"})


def test_defence_options_are_validated_before_anything_runs():
    with pytest.raises(ValueError, match="learning_rates"):
        get_regularizer("meta").from_options({"learning_rates": "0"})
    with pytest.raises(ValueError, match="gammas"):
        get_regularizer("resalign").from_options({"gammas": "-1"})
    with pytest.raises(ValueError, match="tokens"):
        get_regularizer("adversarial").from_options({"tokens": "0"})
    assert get_regularizer("meta").from_options({"learning_rates": "1e-4/1e-3"}).config.learning_rates == (1e-4, 1e-3)


def test_resalign_refuses_an_attacker_that_cannot_move_the_trained_weights(minilm):
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    options = {**DEFENCES["resalign"], "attacker_trains": "non-xattn"}
    request = Request(("striped",), "esd", FAST, None, (RegularizerSpec("resalign", options),), 0)
    with pytest.raises(ValueError, match="attacker must train"):
        get_method("esd").from_options(FAST).unlearn(
            model, request, UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors()))


@pytest.mark.parametrize("method", ["ga", "esd", "ablation", "fdiv", "salun", "sfron"])
def test_every_gradient_method_takes_all_three_defences_at_once(minilm, method):
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    specs = tuple(RegularizerSpec(name, options) for name, options in DEFENCES.items())
    request = Request(("striped",), method, FAST, None, specs, 0)
    result = get_method(method).from_options(FAST).unlearn(
        model, request, UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors()))
    assert result.edit.deltas and all(torch.isfinite(d).all() for d in result.edit.deltas.values())


@pytest.mark.parametrize("rectify", [False, True])
def test_the_adversarys_retain_term_is_added_to_each_step_and_rectified_on_conflict(minilm, monkeypatch, rectify):
    """Inside a request, the loop hands the step's gradient to ``rectify``, which adds
    retain_weight * (theta - theta_0) / n to it, scaled by AEGIS's rule where the two conflict,
    omega ramped over the steps. theta_0 is set per step so that odd steps conflict and even ones
    agree."""
    from conftest import make_tiny_t2i
    from obliviate.regularizers.adversarial import AdversarialErasure
    model = make_tiny_t2i(minilm)
    steps, weight = 4, 10.0
    seen = []
    original = AdversarialErasure.rectify

    def spy(self, session):
        before = {n: p.grad.clone() for n, p in session.params.items()}
        sign = 1 if session.step % 2 else -1  # theta - theta_0 = -g (conflict) or +g
        self.request_start = {n: p.detach() + sign * before[n] for n, p in session.params.items()}
        original(self, session)
        seen.append((session.step, before, {n: p.grad.clone() for n, p in session.params.items()}))
    monkeypatch.setattr(AdversarialErasure, "rectify", spy)
    options = {**FAST, "steps": steps}
    spec = RegularizerSpec("adversarial", {**DEFENCES["adversarial"], "retain_weight": weight, "rectify": rectify})
    request = Request(("striped",), "esd", options, None, (spec,), 0)
    get_method("esd").from_options(options).unlearn(
        model, request, UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors()))
    assert [step for step, *_ in seen] == list(range(steps))
    count = sum(t.numel() for t in seen[0][1].values())
    for step, before, after in seen:
        plain = {n: -weight / count * g if step % 2 else weight / count * g for n, g in before.items()}
        if rectify and step % 2:
            omega = (step + 1) / steps
            assert _inner(after, plain) == pytest.approx((1 - omega) * _inner(before, plain), rel=1e-4)
        else:
            assert all(torch.allclose(after[n] - before[n], plain[n], rtol=1e-4, atol=1e-9) for n in after)


def test_rectify_without_a_retain_term_is_refused():
    with pytest.raises(ValueError, match="retain_weight > 0"):
        get_regularizer("adversarial").from_options({"rectify": "true"})
    with pytest.raises(ValueError, match="retain_weight"):
        get_regularizer("adversarial").from_options({"retain_weight": "-1"})


def test_adversarial_method_objective_runs_the_methods_loss_on_the_attacked_prompts(tiny_t2i, monkeypatch):
    """With objective=method the outer penalty is the method's own loss, every prompt it encodes
    carrying the adversary's states after its first token; outside the penalty nothing is prefixed."""
    from obliviate.methods.safegen import SafeGen
    seen = []
    original = SafeGen.loss

    def loss(self, session):
        encoded = session.encode(["a red circle"])
        seen.append(None if session.prefix is None else (encoded.states.shape[1], session.prefix.clone(), encoded.states[0, 1].clone()))
        return original(self, session)
    monkeypatch.setattr(SafeGen, "loss", loss)
    spec = RegularizerSpec("adversarial", {"inner_steps": 1, "objective": "method", "tokens": 2})
    options = {**FAST, "steps": 1}
    get_method("safegen").from_options(options).unlearn(
        tiny_t2i, Request(("red",), "safegen", options, None, (spec,), 0),
        UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors()))
    plain = tiny_t2i.encode(["a red circle"]).states.shape[1]
    assert seen[0] is None  # the method's step
    length, prefix, first_after_bos = seen[1]  # the penalty
    assert length == plain + 2 and torch.equal(first_after_bos, prefix[0])
    with pytest.raises(ValueError, match="not one of 'anchor', 'method'"):
        get_regularizer("adversarial").from_options({"objective": "keep"})
