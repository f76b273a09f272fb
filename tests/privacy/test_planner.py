"""`fedge privacy plan`: the recommended DP-SGD plan reaches the target ε and follows its rule."""

import json
import math

import pytest

from fedge.privacy import accounting
from fedge.privacy.planner import evaluate_plan, plan_record_level


def test_plan_sigma_reaches_the_target_and_nsr_is_the_closed_form():
    # Prepare: 500 records, B = 100, 4 rounds × 5 steps, 10 clients, d = 10,000
    kw = dict(records_per_client=500, batch_size=100, rounds=4, steps_per_round=5, clients_per_round=10,
              target_epsilon=4.0, delta=1e-5, trainable_params=10_000)
    # Execute
    p = evaluate_plan(**kw)
    # Assert: ε from the accountant (independent call) is at most the target and close to it
    eps = accounting.epsilon(noise_multiplier=p.noise_multiplier, sample_rate=0.2, steps=20, delta=1e-5)
    assert eps <= 4.0 and eps > 0.9 * 4.0
    assert p.epochs == pytest.approx(20 * 100 / 500)
    # NSR per step = σ√d/(B√m); per run = NSR_step/√T
    assert p.nsr_step == pytest.approx(p.noise_multiplier * 100 / (100 * math.sqrt(10)))
    assert p.nsr_run == pytest.approx(p.nsr_step / math.sqrt(20))


def test_recommendation_is_the_smallest_batch_near_the_lowest_noise():
    # Execute
    chosen, table = plan_record_level(records_per_client=512, rounds=4, clients_per_round=8, target_epsilon=8.0,
                                      delta=1e-5, epochs=4, min_steps=8)
    # Assert: candidates are powers of two up to n/2, each covering ≈ the asked epochs
    assert [p.batch_size for p in table] == [8, 16, 32, 64, 128, 256]
    assert all(p.epochs >= 4 for p in table)
    usable = [p for p in table if p.rounds * p.steps_per_round >= 8]
    best = min(p.nsr_run for p in usable)
    assert chosen.nsr_run <= 1.1 * best
    assert all(p.nsr_run > 1.1 * best for p in usable if p.batch_size < chosen.batch_size)
    # larger batches are noisier per step in σ but less noisy per run (the reason for large batches)
    sig = [p.noise_multiplier for p in table]
    assert sig == sorted(sig) and table[-1].nsr_run < table[0].nsr_run


def test_plan_refuses_too_little_data():
    with pytest.raises(ValueError, match="too small"):
        plan_record_level(records_per_client=10, rounds=2, clients_per_round=2, target_epsilon=8, delta=1e-5)


def test_cli_plan_json(capsys):
    # Execute: the same planner through `fedge privacy plan --json`
    rc = accounting.main(["plan", "--records-per-client", "256", "--rounds", "3", "--clients-per-round", "5",
                          "--target-epsilon", "8", "--delta", "1e-5", "--json"])
    out = json.loads(capsys.readouterr().out)
    # Assert
    assert rc == 0 and out["recommended"]["epsilon"] <= 8.0
    assert out["recommended"] in out["candidates"]
