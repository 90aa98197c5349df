import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from obliviate.evaluation import functional as F
from obliviate.evaluation.evaluator import _shows_target
from obliviate.evaluation.metrics import Accuracy, FrechetDistance, UnlearningAccuracy
from obliviate.world import DEFAULT_ONTOLOGY


def test_accuracy_and_ua_on_fixed_predictions():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 2, 2, 0, 2])
    acc = Accuracy()
    acc.update(predicted[:2], target[:2])
    acc.update(predicted[2:], target[2:])
    assert acc.compute() == pytest.approx(4 / 6)
    ua = UnlearningAccuracy()
    ua.update(predicted, torch.full((6,), 2))  # forgotten class 2 seen in 3 of 6 images
    assert ua.compute() == pytest.approx(0.5)
    acc.reset()
    assert np.isnan(acc.compute())
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(predicted, target[:3])


def _binomial_tail(successes: int, trials: int, share: float, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, share), summed term by term."""
    from math import comb
    ks = range(successes, trials + 1) if upper else range(successes + 1)
    return sum(comb(trials, k) * share ** k * (1 - share) ** (trials - k) for k in ks)


@settings(max_examples=40, deadline=None)
@given(trials=st.integers(1, 64), data=st.data(), confidence=st.sampled_from([0.8, 0.95, 0.99]))
def test_binomial_interval_ends_are_where_the_tails_reach_alpha_over_two(trials, data, confidence):
    # Clopper-Pearson's definition, checked by summing the binomial terms: at the lower end the
    # chance of k or more successes is alpha/2, at the upper end that of k or fewer
    successes = data.draw(st.integers(0, trials))
    lower, upper = F.binomial_interval(successes, trials, confidence)
    alpha = 1 - confidence
    assert 0 <= lower <= successes / trials <= upper <= 1
    if successes > 0:
        assert _binomial_tail(successes, trials, lower, upper=True) == pytest.approx(alpha / 2, rel=1e-6)
    else:
        assert lower == 0
    if successes < trials:
        assert _binomial_tail(successes, trials, upper, upper=False) == pytest.approx(alpha / 2, rel=1e-6)
    else:
        assert upper == 1


def test_ua_interval_counts_unseen_images_and_narrows_with_more_of_them():
    small, large = UnlearningAccuracy(), UnlearningAccuracy()
    small.update(torch.tensor([0] * 30 + [1] * 2), torch.ones(32, dtype=torch.long))  # seen in 2 of 32: UA 30/32
    large.update(torch.tensor([0] * 120 + [1] * 8), torch.ones(128, dtype=torch.long))
    assert small.interval() == pytest.approx(F.binomial_interval(30, 32))
    assert small.interval()[0] == pytest.approx(0.7919, abs=1e-4)  # a 0.94 of 32 images may be a 0.79
    (lo_small, hi_small), (lo_large, hi_large) = small.interval(), large.interval()
    assert lo_small < lo_large < large.compute() < hi_large < hi_small
    with pytest.raises(ValueError, match="successes <= trials"):
        UnlearningAccuracy().interval()


def test_frechet_distance_of_diagonal_gaussians_matches_hand_computation():
    # FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 for diagonal covariances
    mean_a, mean_b = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -1.0])
    cov_a, cov_b = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 9.0]))
    expected = (9 + 4) + (1 - 2) ** 2 + (2 - 3) ** 2
    assert F.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, abs=1e-9)
    assert F.frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0, abs=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.integers(1, 199))
def test_streaming_frechet_distance_equals_batch_moments(seed, split):
    gen = torch.Generator().manual_seed(seed)
    real, fake = torch.randn(200, 5, generator=gen), 2 * torch.randn(150, 5, generator=gen) + 1
    metric = FrechetDistance(5)
    metric.update(real[:split], real=True)
    metric.update(real[split:], real=True)
    metric.update(fake, real=False)
    expected = F.frechet_distance(*F.mean_and_covariance(real), *F.mean_and_covariance(fake))
    assert metric.compute() == pytest.approx(expected, rel=1e-6)
    assert metric.compute() > 0


def test_frechet_distance_rejects_wrong_feature_size():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        FrechetDistance(4).update(torch.zeros(3, 5), real=True)


def test_a_combination_target_is_seen_only_when_all_its_concepts_are():
    onto = DEFAULT_ONTOLOGY
    group = {"texture": {onto.index("striped")}, "shape": {onto.index("triangle")}}
    predicted = {"texture": torch.tensor([onto.index("striped"), onto.index("striped"), onto.index("solid")]),
                 "shape": torch.tensor([onto.index("triangle"), onto.index("square"), onto.index("triangle")]),
                 "colour": torch.tensor([0, 0, 0])}
    assert _shows_target(predicted, group, onto).tolist() == [True, False, False]
