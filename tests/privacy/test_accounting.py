"""Accountants against published reference values and closed-form bounds; refusals; the CLI."""

from __future__ import annotations

import json
import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedge.privacy import accounting as A

# -- record level: Opacus' own reference vectors ---------------------------------------
# opacus/tests/accountants_test.py (Opacus 1.6) and STACK.md (σ=1, q=1/32, 12 steps).


@pytest.mark.parametrize("accountant,expected", [("rdp", 1.685), ("prv", 1.188)])
def test_stack_reference_epsilon(accountant, expected):
    eps = A.epsilon(noise_multiplier=1.0, sample_rate=1 / 32, steps=12, delta=1e-5, accountant=accountant)
    assert eps == pytest.approx(expected, abs=1e-3)


def test_opacus_rdp_reference_epsilon():
    # AccountingTest.test_rdp_accountant: σ=1.5, q=0.04, 90 epochs (2250 steps), δ=1e-5
    eps = A.epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04), delta=1e-5)
    assert eps == pytest.approx(7.32911117143, rel=1e-7)


def test_opacus_prv_reference_epsilon():
    # AccountingTest.test_prv_accountant
    eps = A.epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 // 0.04), delta=1e-5, accountant="prv")
    assert eps == pytest.approx(6.777395712150674, rel=1e-6)


@pytest.mark.parametrize("accountant,expected", [("rdp", 1.3562), ("prv", 1.2915)])
def test_opacus_reference_noise_for_epsilon(accountant, expected):
    # AccountingTest.test_get_noise_multiplier_{rdp,prv}_steps: ε=8, δ=1e-5, q=0.04, 2000 steps
    z = A.noise_for_epsilon(target_epsilon=8, sample_rate=0.04, steps=2000, delta=1e-5, accountant=accountant)
    assert z == pytest.approx(expected, abs=1e-4)
    assert A.epsilon(noise_multiplier=z, sample_rate=0.04, steps=2000, delta=1e-5, accountant=accountant) <= 8


def test_history_composes_like_one_run():
    whole = A.epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=30, delta=1e-5)
    split = A.record_level_epsilon([(1.0, 0.05, 10), (1.0, 0.05, 20)], delta=1e-5)
    assert split == pytest.approx(whole, rel=1e-12)
    assert A.record_level_epsilon([], delta=1e-5) == 0.0


# -- user level ------------------------------------------------------------------------


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with sensitivity/std = μ (Balle & Wang 2018, Thm 8)."""
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta  # noqa: E731
    return brentq(f, 0.0, 500.0)


@pytest.mark.parametrize("z,rounds,n", [(1.0, 3, 8), (2.0, 10, 20), (5.0, 50, 10)])
def test_full_participation_is_bounded_below_by_the_exact_replace_one_gaussian(z, rounds, n):
    # Prepare: m = N, so no sampling; replace-one moves the sum by 2S, noise std z·S,
    # T rounds compose to a Gaussian with μ = 2√T / z.
    delta = 1e-3 / n
    exact = exact_gaussian_epsilon(2 * math.sqrt(rounds) / z, delta)
    # Execute
    eps = A.user_level_epsilon(noise_multiplier=z, clients_per_round=n, num_clients=n, rounds=rounds, delta=delta)
    # Assert: an upper bound (never below the exact value), and RDP is within 15 % of it
    assert exact <= eps <= 1.15 * exact


def test_poisson_user_level_is_opacus_with_q_m_over_n():
    eps = A.user_level_epsilon(noise_multiplier=1.0, clients_per_round=10, num_clients=320, rounds=12, delta=1e-5,
                               sampling="poisson")
    assert eps == pytest.approx(1.685, abs=1e-3)  # same (z, q=1/32, 12, δ) as the record-level reference


def test_fixed_sampling_costs_more_than_the_poisson_claim():
    kw = dict(noise_multiplier=1.0, clients_per_round=10, num_clients=320, rounds=12, delta=1e-5)
    assert A.user_level_epsilon(**kw, sampling="fixed") > A.user_level_epsilon(**kw, sampling="poisson")


def test_user_level_epsilon_grows_with_rounds_and_shrinks_with_noise():
    kw = dict(clients_per_round=5, num_clients=50, delta=1e-3)
    e = [A.user_level_epsilon(noise_multiplier=2.0, rounds=r, **kw) for r in (1, 5, 20)]
    assert e[0] < e[1] < e[2]
    assert A.user_level_epsilon(noise_multiplier=4.0, rounds=5, **kw) < e[1]


def test_user_level_noise_for_epsilon_reaches_the_target():
    kw = dict(clients_per_round=10, num_clients=320, rounds=12, delta=1e-5)
    z = A.user_level_noise_for_epsilon(target_epsilon=8.0, **kw)
    assert A.user_level_epsilon(noise_multiplier=z, **kw) <= 8.0
    assert A.user_level_epsilon(noise_multiplier=z * 0.99, **kw) > 8.0


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(delta=0.2), r"delta .* must be < 1/8"),
    (dict(delta=0.0), "delta"),
    (dict(clients_per_round=9), "clients_per_round"),
    (dict(sampling="uniform"), "sampling"),
    (dict(accountant="prv"), "RDP only"),
])
def test_user_level_refusals(kw, match):
    args = {**dict(noise_multiplier=1.0, clients_per_round=4, num_clients=8, rounds=3, delta=1e-3), **kw}
    with pytest.raises(ValueError, match=match):
        A.user_level_epsilon(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(delta=1.0), "delta"),
    (dict(accountant="gdp"), "unknown accountant"),
])
def test_record_level_refusals(kw, match):
    args = {**dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5), **kw}
    with pytest.raises(ValueError, match=match):
        A.epsilon(**args)


def test_unreachable_target_epsilon_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        A.noise_for_epsilon(target_epsilon=1e-3, sample_rate=0.5, steps=10_000, delta=1e-5)
    with pytest.raises(ValueError, match="unreachable"):
        A.user_level_noise_for_epsilon(target_epsilon=1e-3, clients_per_round=8, num_clients=8, rounds=1000,
                                       delta=1e-3)
    with pytest.raises(ValueError, match="target_epsilon"):
        A.noise_for_epsilon(target_epsilon=0.0, sample_rate=0.5, steps=10, delta=1e-5)


# -- CLI ------------------------------------------------------------------------------------


def test_cli_epsilon_json(capsys):
    rc = A.main(["epsilon", "--noise-multiplier", "1.0", "--sample-rate", "0.03125", "--steps", "12",
                 "--delta", "1e-5", "--accountant", "prv", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["epsilon"] == pytest.approx(1.188, abs=1e-3) and out["level"] == "record"


def test_cli_noise_plain_text(capsys):
    rc = A.main(["noise", "--target-epsilon", "8", "--sample-rate", "0.04", "--steps", "2000", "--delta", "1e-5"])
    text = capsys.readouterr().out
    assert rc == 0 and "noise_multiplier" in text and "1.3562" in text


def test_cli_user_level_and_errors(capsys):
    rc = A.main(["user-level", "--noise-multiplier", "1.0", "--clients-per-round", "10", "--num-clients", "320",
                 "--rounds", "12", "--delta", "1e-5", "--sampling", "poisson", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(1.685, abs=1e-3)
    rc = A.main(["user-level", "--noise-multiplier", "1.0", "--clients-per-round", "4", "--num-clients", "8",
                 "--rounds", "3", "--delta", "0.5"])
    assert rc == 2 and "1/8" in capsys.readouterr().err
