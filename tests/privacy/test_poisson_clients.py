"""User-level DP that is true: Poisson client sampling, the accountant that follows the sampler,
the expected-count divisor, secret cohorts, and the budget guard (issues #12.3, #11.3, #11.5)."""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge import config as fcfg
from fedge import deltas
from fedge import protocol as P
from fedge.privacy import accounting
from fedge.privacy import mechanisms as M
from fedge.privacy.ledger import BudgetExceeded, PrivacyLedger, RoundReleased
from strategies import build
from strategies.dp_user_level import UserLevelDP

SHAPES = {"lora_A": (3, 4), "lora_B": (2,)}


class FakeGrid:
    """The parts of Flower's Grid that sampling touches: node ids and the identity query."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, msgs, timeout=None):
        return [Message(RecordDict({P.IDENTITY: ConfigRecord({P.ID_CLIENT: f"client-{m.metadata.dst_node_id:04d}"})}),
                        reply_to=m) for m in msgs]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Instruction messages need a run id, as inside a running ServerApp."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def dp(m: int, *, sampling: str = "poisson", num_clients: int | None = None, seed: int = 0, **kw) -> UserLevelDP:
    inner = build("fedavg", clients_per_round=m, seed=seed)
    return UserLevelDP(inner, **{"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling": sampling,
                                 "num_clients": num_clients, **kw})


def const(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value) for k, s in SHAPES.items()}


def reply(msg: Message, delta: dict) -> Message:
    return Message(RecordDict({
        P.ARRAYS: deltas.to_record(deltas.encode(delta, "fp32")),
        P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: 5.0, P.M_TRAIN_LOSS: 0.123456}),
        P.META: ConfigRecord({P.META_ENCODING: "fp32"}),
    }), reply_to=msg)


def zeros_record():
    return deltas.to_record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})


# -- the sampler: Poisson statistics ---------------------------------------------------------


def test_poisson_inclusion_frequency_is_q_and_clients_join_independently():
    # Prepare: N = 200 clients, m = 20 -> q = 0.1; 400 rounds of the real training sampler
    n, m, rounds = 200, 20, 400
    strat, grid = dp(m), FakeGrid(n)
    q = m / n
    # Execute
    incl = np.zeros((rounds, n), bool)
    for r in range(rounds):
        for node in strat.sample(grid, r + 1, m, purpose=0):
            incl[r, node - 1] = True
    # Assert 1: every client's inclusion count is Binomial(rounds, q): within 5 σ (P(any fails) < 1e-4)
    counts = incl.sum(axis=0)
    sd = np.sqrt(rounds * q * (1 - q))
    assert np.all(np.abs(counts - rounds * q) < 5 * sd), (counts.min(), counts.max())
    # Assert 2: pooled frequency within 4 σ of q
    assert abs(incl.mean() - q) < 4 * np.sqrt(q * (1 - q) / incl.size)
    # Assert 3: independence: the cohort size varies like Binomial(N, q) (fixed-size sampling: variance 0),
    # and two clients' indicators are uncorrelated (pairwise co-inclusion ≈ q²)
    sizes = incl.sum(axis=1)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.3)
    co = (incl[:, :, None] & incl[:, None, :]).mean(axis=0)[np.triu_indices(n, 1)]
    # (its spread comes from the cohort size: sd of k(k−1) ≈ 2·sd(k)/k = 0.42 per round, 0.021 over 400
    # rounds; 0.12 is ~6 σ. A sampler that moves clients together, e.g. all-or-none, gives co ≈ q.)
    assert co.mean() == pytest.approx(q * q, rel=0.12)


def test_fixed_sampling_still_draws_exactly_m():
    strat, grid = dp(7, sampling="fixed"), FakeGrid(50)
    for r in range(1, 30):
        nodes = strat.sample(grid, r, 7, purpose=0)
        assert len(nodes) == len(set(nodes)) == 7


# -- secret cohort (#11.3) ------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_two_dp_runs_with_the_same_seed_sample_different_cohorts(sampling):
    # Prepare: two "runs": strategies built from the same config (seed 7), 500 clients, 10 per round
    a, b = dp(10, sampling=sampling, seed=7), dp(10, sampling=sampling, seed=7)
    grid = FakeGrid(500)
    # Execute
    ca = [a.sample(grid, r, 10, purpose=0) for r in range(1, 6)]
    cb = [b.sample(grid, r, 10, purpose=0) for r in range(1, 6)]
    # Assert: different cohorts (a shared seed would make them equal), and neither is the seeded draw
    seeded = [build("fedavg", clients_per_round=10, seed=7).sample(grid, r, 10, purpose=0) for r in range(1, 6)]
    assert ca != cb and ca != seeded and cb != seeded
    # The cohorts are kept (by client name) for the server's checkpoint
    assert a.cohorts[3] == [a.client_name(x) for x in ca[2]]


def test_non_dp_cohorts_stay_seeded():
    grid = FakeGrid(100)
    x = [build("fedavg", clients_per_round=10, seed=7).sample(grid, r, 10, purpose=0) for r in (1, 2)]
    y = [build("fedavg", clients_per_round=10, seed=7).sample(grid, r, 10, purpose=0) for r in (1, 2)]
    assert x == y


def test_evaluation_cohort_is_the_seeded_one():
    grid = FakeGrid(100)
    assert dp(10, seed=3).sample(grid, 4, 5, purpose=1) == build("fedavg", clients_per_round=10, seed=3).sample(
        grid, 4, 5, purpose=1)


# -- the aggregate: divisor and noise ------------------------------------------------------------


@pytest.mark.parametrize("replies", [0, 2, 4, 7])
def test_divisor_is_the_expected_count_not_the_realized_one(replies):
    # Prepare: m = 4 expected; Poisson cohorts of 0, 2, 4 and 7 clients; tiny noise
    strat = dp(4, noise_multiplier=1e-9, clip_norm=1.0)
    strat.current = {k: np.zeros(s) for k, s in SHAPES.items()}
    ds = [const(0.05 * (i + 1)) for i in range(replies)]
    # Execute
    out = strat.aggregate(ds, np.full(replies, 1.0 / max(replies, 1)))
    # Assert: Σ clip(Δ_i) / 4 whatever the realized count (divided by the realized count it would differ)
    for k in SHAPES:
        want = sum((M.clip_update(d, clip_norm=1.0)[0][k] for d in ds), np.zeros(SHAPES[k])) / 4
        np.testing.assert_allclose(out[k], want, atol=1e-7)
    assert strat.last_event is not None  # every Poisson round releases (and is charged), even an empty one


def test_the_noise_is_present_in_the_emitted_adapter():
    # Prepare: Poisson, N = 40, m = 8, z = 0.8, S = 0.5, fixed clipping; every client sends the same Δ
    z, s, m = 0.8, 0.5, 8
    strat, grid = dp(m, num_clients=40, noise_multiplier=z, clip_norm=s), FakeGrid(40)
    delta = const(0.01)
    residuals = []
    # Execute: 300 real rounds through Flower messages; the released A_t minus the clipped mean
    for r in range(1, 301):
        msgs = list(strat.configure_train(r, zeros_record(), ConfigRecord({}), grid))
        arrays, metrics = strat.aggregate_train(r, [reply(x, delta) for x in msgs])
        got = deltas.from_record(arrays)
        for k in SHAPES:
            residuals.append((got[k] - len(msgs) * delta[k] / m).ravel())
        assert set(metrics.keys()) <= {"dp-noise-std", "dp-next-clip-norm"}  # no counts, no train loss
    # Assert: the emitted values carry N(0, (z·S/m)²) per coordinate (std within 5 %, mean 0)
    res = np.concatenate(residuals)
    assert res.std() == pytest.approx(z * s / m, rel=0.05)
    assert abs(res.mean()) < 4 * z * s / m / np.sqrt(res.size)


# -- the accountant follows the sampler ------------------------------------------------------------


def test_reference_epsilons_fixed_vs_poisson():
    # ../shared/STACK.md: N = 1000, m = 10, z = 1, 500 rounds, δ = 1e-5 -> 15.56 fixed vs 1.65 Poisson
    kw = dict(noise_multiplier=1.0, clients_per_round=10, num_clients=1000, rounds=500, delta=1e-5)
    assert accounting.user_level_epsilon(**kw, sampling="fixed") == pytest.approx(15.56, abs=0.01)
    assert accounting.user_level_epsilon(**kw, sampling="poisson") == pytest.approx(1.65, abs=0.01)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_ledger_charges_what_the_sampler_did(sampling):
    # Prepare: 30 rounds released by the real strategy with one sampler (N = 100, m = 5, z = 1.1)
    strat, grid, ledger = dp(5, sampling=sampling, num_clients=100, noise_multiplier=1.1), FakeGrid(100), PrivacyLedger()
    for r in range(1, 31):
        msgs = list(strat.configure_train(r, zeros_record(), ConfigRecord({}), grid))
        strat.aggregate_train(r, [reply(x, const(0.01)) for x in msgs])
        ledger.record(strat.last_event)
    eps = ledger.user_level_epsilon(delta=1e-5)
    # Oracle: dp-accounting directly, with the adjacency each sampler needs
    if sampling == "fixed":  # m of N without replacement: replace-one, the sum moves by 2S -> z/2
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 5, dp_accounting.GaussianDpEvent(1.1 / 2)), 30)
    else:  # independent inclusion with q = m/N: add/remove, sensitivity S
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 30)
    # Assert: matches the oracle (Opacus' RDP orders differ slightly from dp-accounting's for Poisson)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9 if sampling == "fixed" else 0.03)
    # Fixed-size sampling accounted as add/remove would understate ε by > 2x here: the ledger does not
    poisson_formula = accounting.user_level_epsilon(noise_multiplier=1.1, clients_per_round=5, num_clients=100,
                                                    rounds=30, delta=1e-5, sampling="poisson")
    assert (eps > 2 * poisson_formula) == (sampling == "fixed")


# -- budget guard and fewer clients than planned (#11.5) ----------------------------------------------


def test_fewer_clients_than_planned_warns_and_the_budget_refuses_the_round(caplog):
    # Prepare: fixed sampling planned with N = 40, m = 4, 3 rounds, target ε = what that plan costs;
    # 2 rounds released as planned, then only 20 clients are connected (q doubles)
    plan = dict(noise_multiplier=2.0, clients_per_round=4, num_clients=40, delta=1e-3, sampling="fixed")
    target = accounting.user_level_epsilon(rounds=3, **plan)
    ledger = PrivacyLedger([RoundReleased(round=r, noise_multiplier=2.0, clients_per_round=4, num_clients=40,
                                          sampling="fixed", clip_norm=1.0) for r in (1, 2)])
    strat = dp(4, sampling="fixed", num_clients=40, noise_multiplier=2.0)
    strat.release_guard = lambda ev: ledger.check_release(ev, delta=1e-3, target_epsilon=target)
    # Execute / Assert: refused before any message, nothing recorded as a cohort
    with caplog.at_level(logging.WARNING, logger="fedge.strategy"), pytest.raises(BudgetExceeded, match="round 3"):
        strat.sample(FakeGrid(20), 3, 4, purpose=0)
    assert "20 clients connected, 40 planned" in caplog.text
    assert 3 not in strat.cohorts
    # With the planned population connected, the same round fits the budget exactly
    assert strat.sample(FakeGrid(40), 3, 4, purpose=0)


def test_poisson_keeps_q_when_fewer_clients_connect():
    strat = dp(4, num_clients=40)
    strat.sample(FakeGrid(20), 1, 4, purpose=0)
    ev = strat.prospective_event(1)
    assert ev.clients_per_round / ev.num_clients == pytest.approx(0.1)  # q = m / planned N, ε as planned


# -- configuration ---------------------------------------------------------------------------------------


def test_user_level_defaults_are_poisson_and_adaptive():
    ul = fcfg.load("default", []).privacy.user_level
    assert ul.sampling == "poisson" and ul.adaptive is True
    with pytest.raises(fcfg.ConfigError, match="privacy.user_level.sampling"):
        fcfg.load("default", ["privacy.user_level.sampling=uniform"])


def test_default_count_noise_is_valid_for_small_cohorts():
    # m/20 = 0.5 alone would be refused for z = 1 (needs σ_b > z/2); the default spends ≤ 10 % on the count
    strat = dp(10, noise_multiplier=1.0, adaptive=True)
    assert strat.delta_noise_multiplier == pytest.approx(1.0 / np.sqrt(0.9), rel=1e-9)


def test_server_builds_what_the_config_says_and_refuses_poisson_under_secure_aggregation():
    from server.federation import build_strategy
    from strategies import StrategyError

    dp_on = ["privacy.user_level.enabled=true", "privacy.user_level.noise_multiplier=1", "privacy.user_level.delta=1e-3"]
    strat = build_strategy(fcfg.load("default", dp_on), base_hash="")
    assert (strat.sampling, strat.num_clients, strat.adaptive) == ("poisson", 8, True)
    fixed = build_strategy(fcfg.load("default", dp_on + ["privacy.user_level.sampling=fixed"]), base_hash="")
    assert fixed.sampling == "fixed"
    with pytest.raises(StrategyError, match="privacy.user_level.sampling: poisson cannot be combined"):
        build_strategy(fcfg.load("default", dp_on + ["secure_aggregation.enabled=true"]), base_hash="")
