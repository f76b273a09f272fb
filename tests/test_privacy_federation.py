"""DP in a real federation: ε from the ledger each round, budgets enforced on the device."""

import json

import pytest

from fedge import config as fcfg
from fedge.privacy import accounting, dpsgd
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]


def test_dp_sgd_and_user_level_dp_through_the_simulation_engine(tmp_path, tiny_llama_dir):
    # Prepare: both mechanisms on; a client that already spent almost all its budget
    over = ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=8", "privacy.dp_sgd.delta=1e-3",
            "privacy.user_level.enabled=true", "privacy.user_level.noise_multiplier=1.0",
            "privacy.user_level.clip_norm=0.05", "privacy.user_level.delta=1e-3", "federation.min_replies=1",
            "privacy.user_level.sampling=fixed"]
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + over)
    run = tmp_path / "run"
    spent = [(0.5, 0.5, 200)]  # ε ≫ 8 at δ = 1e-3
    f = run / "client-state" / "partition-000002" / "dp-sgd-history.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(dpsgd.history_to_config(spent)))
    # Execute
    summary = simulate(cfg, run)
    rows = _rows(run)
    # Assert: user-level ε grows with every released round and matches the accountant's closed plan
    eps_user = [r["epsilon_user"] for r in rows]
    assert eps_user[0] < eps_user[1]
    expected = accounting.user_level_epsilon(noise_multiplier=1.0, clients_per_round=3, num_clients=3, rounds=2,
                                             delta=1e-3, sampling="fixed")
    assert eps_user[1] == pytest.approx(expected, rel=1e-9)
    # Record-level: the exhausted client refuses to train, the others report ε within budget. Under
    # user-level DP who was rejected and why is not published: the server's checkpoint has it.
    from server import checkpoint

    for r in rows:
        assert r["accepted"] is None and r["rejected_reasons"] == []
        trained = checkpoint._read(run / "checkpoints" / f"round-{r['round']:04d}").extra["trained"]
        assert trained["accepted"] == 2 and trained["rejected"] == 1
        assert any("privacy budget exhausted" in why for why in trained["rejected_reasons"])
        assert trained["train_loss"] is None  # not privatised, so not sent
        assert 0 < r["epsilon_record_max"] <= 8
    rec = summary["privacy"]["record_level"]["epsilon"]
    assert sorted(rec) == ["partition-000000", "partition-000001"]
    assert json.loads((run / "privacy.json").read_text())["user_level"]["epsilon"] == pytest.approx(eps_user[-1])
    # The device's own accountant history survived on disk: 2 rounds of local steps
    h = dpsgd.history_from_config(json.loads((run / "client-state" / "partition-000000" / "dp-sgd-history.json").read_text()))
    assert len(h) == 2 and all(steps == cfg.train.local_steps for _, _, steps in h)


def test_robust_strategy_with_user_level_dp_is_refused_before_start(tmp_path, tiny_llama_dir):
    from strategies import StrategyError

    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [
        "strategy.name=median", "privacy.user_level.enabled=true", "privacy.user_level.noise_multiplier=1",
        "privacy.user_level.delta=1e-3"])
    with pytest.raises(StrategyError, match="weighted mean"):
        simulate(cfg, tmp_path / "run")
