"""Each algorithm against an oracle: hand-computed optimiser steps, numpy statistics, hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedge import deltas
from strategies import StrategyError, build
from strategies.fedprox import CFG_PROXIMAL_MU

TAU = 1e-3
X0 = {"w": np.array([1.0, -2.0])}
# two clients per round, equal weights: round means Δ1 = [0.3, -0.2], Δ2 = [-0.1, 0.1]
ROUNDS = [[{"w": np.array([0.2, -0.4])}, {"w": np.array([0.4, 0.0])}],
          [{"w": np.array([-0.1, 0.3])}, {"w": np.array([-0.1, -0.1])}]]
D1, D2 = np.array([0.3, -0.2]), np.array([-0.1, 0.1])
HALF = np.array([0.5, 0.5])


def run_two_rounds(name: str, **params) -> list[np.ndarray]:
    s = build(name, clients_per_round=2, **params)
    xs, x = [], X0
    for ds in ROUNDS:
        x = s.server_update(x, s.aggregate(ds, HALF))
        xs.append(x["w"])
    return xs


def test_fedadam_two_rounds_by_hand():
    eta, b1, b2 = 0.1, 0.9, 0.99
    x1, x2 = run_two_rounds("fedadam", eta=eta, beta_1=b1, beta_2=b2, tau=TAU)
    m1, v1 = (1 - b1) * D1, b2 * TAU**2 + (1 - b2) * D1**2  # v_{-1} = τ²
    m2, v2 = b1 * m1 + (1 - b1) * D2, b2 * v1 + (1 - b2) * D2**2
    np.testing.assert_allclose(x1, X0["w"] + eta * m1 / (np.sqrt(v1) + TAU), rtol=1e-12)
    np.testing.assert_allclose(x2, x1 + eta * m2 / (np.sqrt(v2) + TAU), rtol=1e-12)
    # first coordinate, round 1, on paper: 0.1·0.03 / (√(0.99e-6 + 0.01·0.09) + 1e-3)
    assert x1[0] - 1.0 == pytest.approx(0.0967227262, rel=1e-9)


def test_fedyogi_two_rounds_by_hand():
    eta, b1, b2 = 0.1, 0.9, 0.99
    x1, x2 = run_two_rounds("fedyogi", eta=eta, beta_1=b1, beta_2=b2, tau=TAU)
    m1, v1 = (1 - b1) * D1, TAU**2 - (1 - b2) * D1**2 * np.sign(TAU**2 - D1**2)
    m2, v2 = b1 * m1 + (1 - b1) * D2, v1 - (1 - b2) * D2**2 * np.sign(v1 - D2**2)
    np.testing.assert_allclose(x1, X0["w"] + eta * m1 / (np.sqrt(v1) + TAU), rtol=1e-12)
    np.testing.assert_allclose(x2, x1 + eta * m2 / (np.sqrt(v2) + TAU), rtol=1e-12)
    assert np.all(v2 > v1)  # Δ2² > v1 at both coordinates: Yogi's v grows additively


def test_fedadagrad_two_rounds_by_hand():
    eta = 0.1
    x1, x2 = run_two_rounds("fedadagrad", eta=eta, tau=TAU)  # β₁ = 0: m_t = Δ_t
    v1 = TAU**2 + D1**2
    v2 = v1 + D2**2
    np.testing.assert_allclose(x1, X0["w"] + eta * D1 / (np.sqrt(v1) + TAU), rtol=1e-12)
    np.testing.assert_allclose(x2, x1 + eta * D2 / (np.sqrt(v2) + TAU), rtol=1e-12)


def test_fedavgm_two_rounds_by_hand():
    x1, x2 = run_two_rounds("fedavgm", server_lr=0.5, momentum=0.9)
    v1 = D1
    v2 = 0.9 * v1 + D2
    np.testing.assert_allclose(x1, X0["w"] + 0.5 * v1, rtol=1e-12)
    np.testing.assert_allclose(x2, x1 + 0.5 * v2, rtol=1e-12)


def test_optimiser_state_keys():
    s = build("fedadam", clients_per_round=2)
    s.server_update(X0, s.aggregate(ROUNDS[0], HALF))
    assert sorted(s.state_dict()) == ["m/w", "v/w"]
    m = build("fedavgm", clients_per_round=2)
    m.server_update(X0, m.aggregate(ROUNDS[0], HALF))
    assert sorted(m.state_dict()) == ["m/w"]


# -- robust rules against numpy --------------------------------------------------

def client_stack(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ds = [{"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)} for _ in range(n)]
    return ds, np.full(n, 1 / n)


@pytest.mark.parametrize("n", [5, 6])
def test_median_is_numpy_median(n):
    ds, w = client_stack(n)
    got = build("median", clients_per_round=n).aggregate(ds, w)
    for k in ds[0]:
        np.testing.assert_array_equal(got[k], np.median([d[k] for d in ds], axis=0))


@pytest.mark.parametrize("n,beta,k", [(10, 0.2, 2), (7, 0.3, 2), (5, 0.1, 0), (9, 0.49, 4)])
def test_trimmed_mean_by_sorting_each_coordinate(n, beta, k):
    ds, w = client_stack(n)
    got = build("trimmed-mean", clients_per_round=n, beta=beta).aggregate(ds, w)
    for key in ds[0]:
        for idx in np.ndindex(ds[0][key].shape):
            values = sorted(d[key][idx] for d in ds)[k:n - k]  # drop k = ⌊βn⌋ at each end
            assert got[key][idx] == pytest.approx(sum(values) / len(values), rel=1e-12)


def test_krum_picks_the_central_honest_vector():
    # honest around (1, 0); [1, 0] is closest to its n − f − 2 = 2 nearest; one attacker far away
    vecs = [[1.1, 0.0], [100.0, 100.0], [1.0, 0.0], [0.9, 0.0], [1.0, 0.1]]
    ds = [{"x": np.array(v)} for v in vecs]
    got = build("krum", clients_per_round=5, f=1).aggregate(ds, np.full(5, 0.2))
    np.testing.assert_array_equal(got["x"], [1.0, 0.0])
    # scores by hand: [1,0] -> .01+.01; [1.1,0] -> .01+.02; [.9,0] -> .01+.02; [1,.1] -> .01+.02
    multi = build("multikrum", clients_per_round=5, f=1).aggregate(ds, np.full(5, 0.2))  # m = n − f = 4
    np.testing.assert_allclose(multi["x"], [1.0, 0.025])


def test_bulyan_on_a_hand_built_case():
    # n = 7, f = 1: θ = 5 picked by Krum (the attacker and the outlier 3.0 are left), β = 3 per coordinate
    vals = [0.0, 0.1, 0.2, 0.3, 0.4, 3.0, -50.0]
    ds = [{"x": np.array([v, -v])} for v in vals]
    got = build("bulyan", clients_per_round=7, f=1).aggregate(ds, np.full(7, 1 / 7))
    np.testing.assert_allclose(got["x"], [0.2, -0.2])  # median 0.2, nearest three 0.1, 0.2, 0.3


@pytest.mark.parametrize("name,f,n,factor", [("krum", 1, 4, 2), ("multikrum", 2, 6, 2), ("bulyan", 1, 6, 4)])
def test_too_few_clients_are_refused(name, f, n, factor):
    with pytest.raises(StrategyError, match=rf"{name} needs n >= {factor}f\+3 clients: got n={n}, f={f}"):
        build(name, clients_per_round=n, f=f)
    s = build(name, clients_per_round=factor * f + 3, f=f)
    assert s.min_replies == factor * f + 3  # fewer valid replies: the round keeps the global adapter
    ds, w = client_stack(n)
    with pytest.raises(ValueError, match=rf"{name} needs n >= {factor}f\+3 clients: got n={n}, f={f}"):
        s.aggregate(ds, w)


# -- norm bounding ------------------------------------------------------------------

def test_norm_bounding_is_the_mean_of_clipped_deltas():
    rng = np.random.default_rng(5)
    ds = []
    for norm in (0.5, 2.0, 10.0, 0.0):
        d = {"a": rng.standard_normal((2, 2)), "b": rng.standard_normal(3)}
        scale = norm / deltas.l2_norm(d)
        ds.append({k: v * scale for k, v in d.items()})
    w = np.array([0.1, 0.2, 0.3, 0.4])
    got = build("norm-bounding", clients_per_round=4, norm_bound=1.0).aggregate(ds, w)
    expected = {k: np.zeros_like(v) for k, v in ds[0].items()}
    for wi, d in zip(w, ds):
        n = deltas.l2_norm(d)
        factor = 1.0 if n <= 1.0 else 1.0 / n  # min(1, M/‖Δ‖)
        for k in d:
            expected[k] += wi * factor * d[k]
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12)
    assert deltas.l2_norm(got) <= 1.0


def test_norm_bounding_never_divides_by_zero_nor_stretches():
    s = build("norm-bounding", clients_per_round=3, norm_bound=0.3)
    zeros = [{"a": np.zeros((2, 2))} for _ in range(3)]
    with np.errstate(all="raise"):
        got = s.aggregate(zeros, np.full(3, 1 / 3))
    np.testing.assert_array_equal(got["a"], 0.0)
    from strategies.norm_bounding import clip_to_norm
    rng = np.random.default_rng(6)
    for norm in (0.0, 1e-300, 0.29, 0.3, 0.3000001, 5.0, 1e100):
        d = {"a": rng.standard_normal(4)}
        d = {"a": d["a"] * (norm / deltas.l2_norm(d))}
        assert deltas.l2_norm(clip_to_norm(d, 0.3)) <= deltas.l2_norm(d)
        assert deltas.l2_norm(clip_to_norm(d, 0.3)) <= 0.3 * (1 + 1e-15)


# -- FedProx -----------------------------------------------------------------------

def test_fedprox_sends_mu_to_clients(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    from tests.strategies.test_strategy_contract import FakeGrid

    s = build("fedprox", clients_per_round=2, mu=0.05)
    msgs = list(s.configure_train(4, deltas.to_record({"w": np.zeros(2, np.float32)}), ConfigRecord({"lr": 0.1}), FakeGrid()))
    assert len(msgs) == 2
    for m in msgs:
        cfg = m.content["config"]
        assert cfg[CFG_PROXIMAL_MU] == 0.05 and cfg["lr"] == 0.1
    assert build("fedavg", clients_per_round=2).round_config(1) == {}


# -- hyperparameters are checked at construction ----------------------------------

@pytest.mark.parametrize("name,params,words", [
    ("fedavgm", {"momentum": 1.0}, "momentum must be in [0, 1)"),
    ("fedavgm", {"server_lr": 0.0}, "server_lr must be a positive number"),
    ("fedprox", {"mu": -0.1}, "mu must be a finite number >= 0"),
    ("fedadam", {"beta_2": 1.0}, "beta_2 must be in [0, 1)"),
    ("fedyogi", {"beta_1": -0.1}, "beta_1 must be in [0, 1)"),
    ("fedadagrad", {"tau": 0.0}, "tau must be a positive number"),
    ("fedadam", {"eta": float("nan")}, "eta must be a positive number"),
    ("trimmed-mean", {"beta": 0.5}, "beta must be in [0, 0.5)"),
    ("krum", {"f": -1}, "f (number of Byzantine clients) must be an integer >= 0"),
    ("multikrum", {"num_selected": 21}, "num_selected must be in [1, clients_per_round=20]"),
    ("bulyan", {"f": 1.5}, "must be an integer"),
    ("norm-bounding", {"norm_bound": 0.0}, "norm_bound must be a positive number"),
])
def test_bad_hyperparameters_are_refused(name, params, words):
    with pytest.raises(StrategyError) as err:
        build(name, clients_per_round=20, **params)
    assert words in str(err.value)
