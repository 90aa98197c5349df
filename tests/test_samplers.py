"""O-BELM: exact inversion (an image inverted to noise regenerates to itself), second-order
accuracy on a Gaussian whose probability-flow ODE is solved in closed form, and use as a solver."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from obliviate.models.belm import BELMOptions, BELMScheduler, OBELMScheduler
from obliviate.models.zoo import load_t2i
from obliviate.world import render, sample_scenes

MU, TAU = 0.3, 0.5  # data: every pixel ~ N(MU, TAU^2), independently


def gaussian_eps(x, alpha, sigma):
    """The exact noise prediction for Gaussian data: E[eps | x_t]."""
    return sigma * (x - alpha * MU) / (alpha**2 * TAU**2 + sigma**2)


def scheduler(steps, prediction_type="epsilon", a=None):
    """O-BELM, or the BELM member with fixed weight ``a``."""
    s = OBELMScheduler(prediction_type=prediction_type) if a is None else BELMScheduler(prediction_type=prediction_type)
    if a is not None:
        s.options = BELMOptions(a=a)
    s.set_timesteps(steps)
    return s


def generate(s, x, eps_at, ddim_only=False):
    for t in s.timesteps:
        i = s.index(t)
        if ddim_only:
            s.resume(None)
        x = s.step(eps_at(x, i), t, x).prev_sample
    return x


def exact_clean(s, x_noise):
    """Where the probability-flow ODE takes x_N for Gaussian data: the same quantile at t = 0."""
    alpha, sigma = s.alpha[-1], s.sigma[-1]
    return MU + TAU * (x_noise - alpha * MU) / torch.sqrt(alpha**2 * TAU**2 + sigma**2)


def test_o_belm_is_second_order_where_ddim_is_first_order():
    x_noise = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for ddim_only in (False, True):
        for steps in (10, 20):
            s = scheduler(steps)
            eps_at = lambda x, i: gaussian_eps(x, s.alpha[i], s.sigma[i])  # noqa: E731
            errors[ddim_only, steps] = (generate(s, x_noise, eps_at, ddim_only) - exact_clean(s, x_noise)).abs().max()
    assert errors[False, 10] < errors[True, 10] / 3
    assert errors[False, 10] / errors[False, 20] > 3.0  # error ~ N^-2
    assert errors[True, 10] / errors[True, 20] < 2.5  # error ~ N^-1


def test_a_fixed_weight_belm_member_is_first_order():
    x_noise = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (10, 20, 40):
        s = scheduler(steps, a=0.5)
        eps_at = lambda x, i: gaussian_eps(x, s.alpha[i], s.sigma[i])  # noqa: E731
        errors[steps] = (generate(s, x_noise, eps_at) - exact_clean(s, x_noise)).abs().max()
    assert errors[20] < errors[10] and errors[20] / errors[40] < 2.5  # error ~ N^-1, not N^-2


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(2, 60), seed=st.integers(0, 2**16), v=st.booleans(), a=st.sampled_from([None, 1.0]))
def test_inverting_then_regenerating_returns_the_image_in_float64(steps, seed, v, a):
    """Any eps(x, t) works: exactness comes from the relation, not from a good model (O-BELM and
    the leapfrog member alike; other fixed weights amplify rounding, see ``models.belm``)."""
    weights = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) / 3
    s = scheduler(steps, "v_prediction" if v else "epsilon", a)
    model = lambda x, i: torch.tanh(x @ weights + float(s.s[max(i, 1)]))  # noqa: E731
    clean = torch.rand(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    lower, x = None, clean
    for i in range(steps):
        lower, x = x, s.invert_step(model(x, i), i, x, lower)
    s.resume(x)
    regenerated = lower
    for t in s.timesteps[1:]:
        regenerated = s.step(model(regenerated, s.index(t)), t, regenerated).prev_sample
    assert torch.allclose(regenerated, clean, atol=1e-9, rtol=0)


def test_the_shipped_model_inverts_renders_to_noise_and_back_in_float32():
    model = load_t2i("shapes-t2i-v2")
    scenes = sample_scenes(4, seed=3)
    images = torch.from_numpy(render(scenes))
    prompts = ["a striped red triangle", "a blue circle", "a dotted green square", "a star"]
    states = model.invert(images, prompts, steps=20)
    regenerated = model.regenerate(states, prompts, steps=20)
    assert (regenerated - images).abs().max() < 1e-4
    elsewhere = model.regenerate(states, prompts[::-1], steps=20)  # the states alone do not hold the images
    assert (elsewhere - images).abs().mean() > 1e-2


def test_o_belm_samples_like_the_other_solvers(tiny_t2i):
    images = tiny_t2i.sample(["a red circle"] * 2, steps=4, seed=1, solver="o-belm")
    again = tiny_t2i.sample(["a red circle"] * 2, steps=4, seed=1, solver="o-belm")
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, again)
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        scheduler(4).step(torch.zeros(1), 7, torch.zeros(1))


def test_the_sampler_benchmark_writes_a_row_per_solver_and_step_count(tmp_path, tiny_model_dir):
    from obliviate.bench import sampler_benchmark
    table = sampler_benchmark(str(tiny_model_dir), ["ddim", "o-belm"], [2, 3], tmp_path, n_prompts=2,
                              images_per_prompt=1, inversion_images=2, echo=lambda line: None)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ddim") or line.startswith("| o-belm")]
    assert [(r[0], r[1]) for r in rows] == [("| ddim", "2"), ("| ddim", "3"), ("| o-belm", "2"), ("| o-belm", "3")]
    assert [r[-1] for r in rows][:2] == ["- |", "- |"] and float(rows[2][-1].rstrip(" |")) < 1e-4
    assert (tmp_path / f"{tiny_model_dir.name}.md").read_text() == table


def lml_and_plain(model, spec, plain="ddim"):
    from obliviate.models.t2i import make_scheduler
    steps = []
    for solver in (spec, plain):
        s = make_scheduler(solver, model.scheduler.config)
        s.set_timesteps(5)
        x, out = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), []
        for t in s.timesteps:
            eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(int(t)))
            x = s.step(eps, t, x).prev_sample
            out.append(x)
        steps.append(out)
    return steps


@pytest.mark.parametrize("plain", ["ddim", "dpm"])
def test_lml_with_the_released_default_momentum_is_the_plain_solver(tiny_t2i, plain):
    lml, steps = lml_and_plain(tiny_t2i, f"{plain}-lml:momentum=0", plain)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lml, steps))


@pytest.mark.parametrize("plain", ["ddim", "dpm"])
def test_lml_with_momentum_changes_the_step(tiny_t2i, plain):
    lml, steps = lml_and_plain(tiny_t2i, f"{plain}-lml:momentum=0.5", plain)
    assert torch.allclose(lml[0], steps[0], atol=1e-5)  # the first step has no average yet
    assert not torch.allclose(lml[-2], steps[-2], atol=1e-3)


def test_first_order_dpm_lml_is_ddim_lml(tiny_t2i):
    from obliviate.models.lml import DPMLMLScheduler, LMLOptions, LMLScheduler
    ddim = LMLScheduler.from_config(tiny_t2i.scheduler.config)
    dpm = DPMLMLScheduler.from_config(tiny_t2i.scheduler.config, solver_order=1)
    ddim.set_timesteps(5)
    dpm.set_timesteps(timesteps=ddim.timesteps.tolist())  # the same steps, ending at x0 alike
    x = {}
    for s in (ddim, dpm):
        s.options = LMLOptions(momentum=0.5)
        x[s] = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in ddim.timesteps:
        eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(int(t)), dtype=torch.float64)
        x = {s: s.step(eps, t, x[s]).prev_sample for s in (ddim, dpm)}
        assert torch.allclose(x[ddim], x[dpm], atol=1e-6), int(t)


def test_lml_keeps_the_noise_estimate_s_length(tiny_t2i):
    from obliviate.models.lml import LMLOptions, LMLScheduler
    s = LMLScheduler.from_config(tiny_t2i.scheduler.config)
    s.options, s._average = LMLOptions(damping=1e-12, momentum=0.5), torch.randn(1, 64, dtype=torch.float64)
    eps = torch.randn(1, 64, dtype=torch.float64)
    corrected = s.corrected_noise(eps)
    assert torch.allclose(corrected.norm(), eps.norm()) and abs(float(corrected @ s._average.T)) < 1e-3 * float(eps.norm() * s._average.norm())


def test_solver_specs_are_checked(tiny_t2i):
    for solver in ("ddim-lml:momentum=0.3", "dpm-lml:momentum=0.3"):
        assert tiny_t2i.sample(["a red circle"], steps=3, solver=solver).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="Valid options: damping"):
        tiny_t2i.sample(["a red circle"], steps=3, solver="ddim-lml:kappa=0.3")
    with pytest.raises(ValueError, match="outside its range"):
        tiny_t2i.sample(["a red circle"], steps=3, solver="ddim-lml:momentum=2")
    with pytest.raises(ValueError, match="takes no options"):
        tiny_t2i.sample(["a red circle"], steps=3, solver="dpm:order=2")


def test_fisher_of_a_gaussian_is_the_inverse_variance_exactly():
    from obliviate.models.fisher import fisher_trace, fisher_vector_product
    s = scheduler(10)
    alpha, sigma = float(s.alpha[5]), float(s.sigma[5])
    eps_fn = lambda x: gaussian_eps(x, alpha, sigma)  # noqa: E731
    x, v = torch.randn(3, 48, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64)
    variance = alpha**2 * TAU**2 + sigma**2
    assert torch.allclose(fisher_vector_product(eps_fn, x, v, sigma), v / variance)
    assert torch.allclose(fisher_trace(eps_fn, x, sigma, probes=2), torch.full((3,), 48 / variance, dtype=torch.float64))


def test_fisher_products_and_trace_agree_with_autodiff_on_a_unet(tiny_t2i):
    from obliviate.models.fisher import fisher_trace, fisher_vector_product, forward_mode_attention
    encoding, t, sigma = tiny_t2i.encode(["a red circle"]), torch.tensor([400]), 0.7
    x, v = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 3, 8, 8)
    eps_fn = lambda x: tiny_t2i.predict(x, t, encoding)  # noqa: E731
    autodiff = lambda v: torch.autograd.functional.jvp(eps_fn, x, v)[1] / sigma  # noqa: E731  (reverse over reverse)
    with forward_mode_attention(tiny_t2i.unet):
        assert torch.allclose(fisher_vector_product(eps_fn, x, v, sigma), autodiff(v), atol=1e-5, rtol=1e-4)
        difference = fisher_vector_product(eps_fn, x, v, sigma, "difference")
        assert float((difference - autodiff(v)).norm() / autodiff(v).norm()) < 1e-2  # float32 rounding over the step
        estimate = fisher_trace(eps_fn, x, sigma, probes=3, seed=5)
        generator = torch.Generator().manual_seed(5)  # the same Rademacher probes
        probes = [(torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).float() for _ in range(3)]
        reference = sum(float((z * autodiff(z)).sum()) for z in probes) / 3
    assert abs(float(estimate[0]) - reference) < 1e-3 * max(1.0, abs(reference))


def test_the_fisher_speed_table_times_each_way(tmp_path, tiny_model_dir):
    from obliviate.bench import fisher_speed
    table = fisher_speed(str(tiny_model_dir), tmp_path, batch=1, repeats=1)
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "ms" not in line] == [
        "| forward mode (ours)", "| central difference (ours)", "| autodiff, reverse over reverse",
        "| one plain forward pass (for scale)"]
    assert (tmp_path / "fisher.md").read_text() == table


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_the_ode_likelihood_of_gaussian_data_is_its_density_to_second_order(beta_schedule):
    from obliviate.evaluation.likelihood import log_likelihood
    abar = OBELMScheduler(beta_schedule=beta_schedule).alphas_cumprod
    x0 = MU + TAU * torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps_fn = lambda x, t: gaussian_eps(x, abar[t].sqrt(), (1 - abar[t]).sqrt())  # noqa: E731
    exact = (-0.5 * ((x0 - MU) / TAU) ** 2 - math.log(TAU * math.sqrt(2 * math.pi))).sum(1)
    bits_error = {n: float((log_likelihood(eps_fn, x0, abar, steps=n) - exact).abs().max()) / 64 / math.log(2)
                  for n in (25, 50)}
    assert bits_error[50] < 0.05 and bits_error[25] / bits_error[50] > 3  # Heun: error ~ steps^-2


def test_bits_per_dim_of_renders_under_a_unet_are_finite_and_reproducible(tiny_t2i):
    from obliviate.evaluation.likelihood import bits_per_dim
    images = torch.from_numpy(render(sample_scenes(2, seed=1)))[:, :, :16, :16]
    first = bits_per_dim(tiny_t2i, images, ["a red circle", "a blue star"], steps=4)
    assert first.shape == (2,) and torch.isfinite(first).all()
    assert torch.equal(first, bits_per_dim(tiny_t2i, images, ["a red circle", "a blue star"], steps=4))
    assert next(tiny_t2i.unet.parameters()).dtype == torch.float32  # the model is left as it was
