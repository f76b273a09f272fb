"""The one-run audit bound (Steinke et al. 2023) against closed forms and a Clopper–Pearson oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from fedge.privacy import audit as A


def test_perfect_separation_gives_the_closed_form_maximum():
    # Prepare: m canaries, the included ones all score above the excluded ones.
    m, k, p = 1000, 100, 0.05
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    scores = np.where(included, 10.0, 0.0) + rng.random(m)
    # Execute: guess the top k and bottom k, δ = 0 (one k: no Bonferroni).
    got = A.one_run_epsilon(scores, included, delta=0.0, p=p, k_grid=[k])
    # Assert: all r = 2k guesses right -> ε_lb = logit(p^{1/r}).
    assert got["v"] == got["r"] == 2 * k
    assert got["epsilon_lb"] == pytest.approx(math.log(p ** (1 / (2 * k)) / (1 - p ** (1 / (2 * k)))), abs=1e-5)
    assert got["epsilon_lb"] == pytest.approx(A.perfect_epsilon(r=2 * k, p=p), abs=1e-5)


def test_delta_lowers_the_bound_and_stays_below_the_pure_one():
    m, p = 1000, 0.05
    pure = A.epsilon_from_guesses(m=m, r=200, v=200, delta=0.0, p=p)
    approx = A.epsilon_from_guesses(m=m, r=200, v=200, delta=1e-5, p=p)
    assert 0 < approx < pure


def test_identical_distributions_give_zero():
    # Prepare: scores independent of membership.
    rng = np.random.default_rng(1)
    m = 5000
    included = rng.random(m) < 0.5
    scores = rng.normal(size=m)
    # Execute
    got = A.one_run_epsilon(scores, included, delta=1e-5)
    # Assert: no evidence of leakage (a 95% bound may exceed 0 with prob. ≤ 5%; this seed does not).
    assert got["epsilon_lb"] < 0.05
    assert A.auroc(scores, included) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("r,v", [(200, 150), (1000, 610), (50, 50), (400, 230)])
def test_pure_bound_is_the_clopper_pearson_logit(r, v):
    # Oracle: with δ = 0 the p-value is P[Bin(r, q) ≥ v], so the largest rejected q is the
    # one-sided Clopper–Pearson lower limit Beta⁻¹(p; v, r − v + 1).
    p = 0.05
    q_lo = stats.beta.ppf(p, v, r - v + 1)
    expected = max(0.0, float(special.logit(q_lo)))
    assert A.epsilon_from_guesses(m=r, r=r, v=v, delta=0.0, p=p) == pytest.approx(expected, abs=1e-4)
    lo, hi = A.clopper_pearson(v, r, p=p)
    assert lo == pytest.approx(q_lo, rel=1e-9)
    assert hi == 1.0 if v == r else hi == pytest.approx(stats.beta.ppf(1 - p, v + 1, r - v), rel=1e-9)


def test_p_value_matches_the_papers_loop():
    # Oracle: Steinke et al. Appendix D, written as the paper's explicit loop over i.
    m, r, v, eps, delta = 2000, 300, 230, 1.2, 1e-4
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    assert A.p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(min(1.0, beta + 2 * m * delta * alpha))


def test_gaussian_scores_stay_below_the_mechanisms_epsilon():
    # An idealised Gaussian mechanism with μ = 1 (μ-GDP, ε ≈ 4.4 at δ = 1e-5): ε_lb must
    # stay below its ε and above 0 with 4000 canaries.
    rng = np.random.default_rng(2)
    m = 4000
    included = rng.random(m) < 0.5
    scores = rng.normal(size=m) + 1.0 * included
    eps_true = 4.4  # δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) = 1e-5 near ε = 4.4 for μ = 1
    assert stats.norm.cdf(-eps_true + 0.5) - math.exp(eps_true) * stats.norm.cdf(-eps_true - 0.5) < 1.2e-5
    got = A.one_run_epsilon(scores, included, delta=1e-5)
    assert 1.0 < got["epsilon_lb"] < eps_true


def test_exposure_tpr_auroc_closed_forms():
    # exposure: a score above all 7 references has rank 1 -> log2(8) bits; below all -> 0.
    ref = np.arange(7.0)
    # 3.0 ties with one reference and has 3 above: rank 5 -> 3 − log2(5).
    assert A.exposure([100.0, -1.0, 3.0], ref) == pytest.approx([3.0, 0.0, 3.0 - math.log2(5)])
    # TPR at FPR: perfect separation -> 1; AUROC -> 1; reversed -> 0.
    inc = np.array([1, 1, 1, 0, 0, 0], bool)
    s = np.array([5, 6, 7, 1, 2, 3.0])
    assert A.tpr_at_fpr(s, inc, fpr=0.0) == 1.0 and A.auroc(s, inc) == 1.0 and A.auroc(-s, inc) == 0.0
    # One excluded score above two included ones: at FPR 0 only the included above it count.
    s2 = np.array([5, 1, 7, 6, 2, 3.0])
    assert A.tpr_at_fpr(s2, inc, fpr=0.0) == pytest.approx(1 / 3)
    assert A.auroc(s2, inc) == pytest.approx(5 / 9)  # pairs won: 5>{2,3}, 1>{}, 7>{6,2,3}


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="same length"):
        A.one_run_epsilon([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        A.one_run_epsilon([1.0, 2.0], [True, False], delta=2.0)
    with pytest.raises(ValueError, match="finite"):
        A.one_run_epsilon([1.0, math.nan], [True, False], delta=1e-5)
