"""The f-DP one-run bound (Mahloujifar et al. 2024) against the binomial test, the exact ε-DP bound,
dp-accounting's Gaussian mechanism and Monte Carlo runs of the mechanism it describes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedge.privacy import audit as A
from fedge.privacy import audit_fdp as F


def _gaussian_run(rng: np.random.Generator, *, m: int, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """Canary scores of the exact μ-GDP mechanism seen through its likelihood-ratio score."""
    included = rng.random(m) < 0.5
    return rng.normal(size=m) + mu * included, included


def _correct(scores: np.ndarray, included: np.ndarray, k: int) -> int:
    order = np.argsort(-scores)
    return int(included[order[:k]].sum() + (~included[order[-k:]]).sum())


@pytest.mark.parametrize(("m", "guesses"), [(100, 100), (1000, 200), (1000, 1000), (50, 10)])
def test_at_mu_zero_the_bound_is_the_binomial_test(m, guesses):
    # Prepare: μ = 0 is perfect privacy: every guess is a fair coin, so P[≥ c right] = P[Bin(c', ½) ≥ c].
    tau = 0.05
    no_privacy_loss = F.gaussian_inverse_blow_up(0.0)
    # Execute: the smallest count of right guesses each test rejects.
    fdp = next(c for c in range(guesses + 1)
               if F.rejects(no_privacy_loss, m=m, guesses=guesses, correct=c, tau=tau))
    exact = next(c for c in range(guesses + 1) if stats.binom.sf(c - 1, guesses, 0.5) < tau)
    # Assert: never rejects what the exact test keeps (valid), and at most one guess more (tight).
    assert exact <= fdp <= exact + 1


@pytest.mark.parametrize(("m", "guesses", "correct"), [(1000, 200, 150), (1000, 1000, 700), (100, 20, 20),
                                                       (10000, 1000, 900)])
def test_pure_dp_family_stays_at_or_below_the_exact_randomized_response_bound(m, guesses, correct):
    # Prepare / Execute: at δ = 0 Steinke et al.'s bound is exact (Clopper–Pearson on ε-DP randomized
    # response); the f-DP recursion with the (ε, 0) trade-off is a different, valid route to it.
    fdp = F.epsilon_from_guesses(m=m, guesses=guesses, correct=correct, delta=0.0)
    exact = A.epsilon_from_guesses(m=m, r=guesses, v=correct, delta=0.0)
    # Assert
    assert 0.97 * exact <= fdp <= exact + 1e-4


@pytest.mark.parametrize(("mu", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (0.3, 1e-3)])
def test_gdp_epsilon_is_dp_accountings_gaussian_mechanism(mu, delta):
    # Prepare: the Gaussian mechanism of sensitivity 1 and noise σ = 1/μ is exactly μ-GDP.
    dp_accounting = pytest.importorskip("dp_accounting")
    event = dp_accounting.GaussianDpEvent(noise_multiplier=1.0 / mu)
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(event)
    # Execute / Assert
    assert F.gdp_epsilon(mu, delta) == pytest.approx(accountant.get_epsilon(delta), rel=2e-3, abs=2e-3)


def test_the_bound_holds_on_runs_of_the_mechanism_it_describes():
    # Prepare: 300 runs of the exact μ-GDP mechanism (μ = 1, 1000 canaries), 100 guesses a side.
    rng = np.random.default_rng(0)
    mu, m, k, p = 1.0, 1000, 100, 0.05
    # Execute
    lbs = []
    for _ in range(300):
        scores, included = _gaussian_run(rng, m=m, mu=mu)
        lbs.append(F.mu_from_guesses(m=m, guesses=2 * k, correct=_correct(scores, included, k), p=p))
    lbs_arr = np.asarray(lbs)
    # Assert: above the true μ in at most p of the runs (binomial slack), and the audit has power.
    assert (lbs_arr > mu).mean() <= p + 3 * np.sqrt(p * (1 - p) / len(lbs))
    assert np.median(lbs_arr) > 0.4 * mu


def test_tighter_than_steinke_on_the_gaussian_mechanism():
    # Prepare: the user-level white-box setting of the audit bench, ideal scores at ε = 4 (μ = 0.925).
    rng = np.random.default_rng(1)
    mu = 0.925
    scores, included = _gaussian_run(rng, m=10_000, mu=mu)
    # Execute
    fdp = F.one_run_fdp(scores, included, delta=1e-5)
    steinke = A.one_run_epsilon(scores, included, delta=1e-5)
    # Assert: the Gaussian-family bound reads more of ε (Mahloujifar et al.'s point) and stays below it.
    assert F.gdp_epsilon(mu, 1e-5) == pytest.approx(4.0, abs=0.01)
    assert steinke["epsilon_lb"] < fdp["epsilon_lb_gdp"] < 4.0
    assert fdp["mu_lb"] < mu
    assert fdp["epsilon_lb_approx"] < 4.0


def test_membership_independent_scores_give_almost_nothing():
    rng = np.random.default_rng(2)
    included = rng.random(5000) < 0.5
    got = F.one_run_fdp(rng.normal(size=5000), included, delta=1e-5)
    assert got["mu_lb"] < 0.05 and got["epsilon_lb_approx"] < 0.1


def test_a_mechanism_without_noise_is_rejected_far_above_its_claim():
    # Prepare: "noise off": included canaries all score above the excluded ones, claim μ = 0.5.
    rng = np.random.default_rng(3)
    included = rng.random(2000) < 0.5
    scores = included * 10.0 + rng.random(2000)
    # Execute
    got = F.one_run_fdp(scores, included, delta=1e-5)
    # Assert
    assert got["mu_lb"] > 3 * 0.5 and got["epsilon_lb_gdp"] > 3 * F.gdp_epsilon(0.5, 1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        F.rejects(F.gaussian_inverse_blow_up(1.0), m=10, guesses=20, correct=5, tau=0.05)
    with pytest.raises(ValueError, match="1 - confidence"):
        F.mu_from_guesses(m=10, guesses=4, correct=4, p=1.5)
    with pytest.raises(ValueError, match="delta"):
        F.gdp_epsilon(1.0, -1.0)
