"""Secure aggregation through Flower's simulation engine: the aggregate equals the plain one."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge import config as fcfg
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow

N = 5


def _one_failing_seed(rate: float) -> tuple[int, int]:
    """A seed for which the fault mod fails exactly one of N clients in round 1 (same rule as faults.py)."""
    for seed in range(1000):
        fails = [pid for pid in range(N) if np.random.default_rng([seed, 1, pid, 7]).random() < rate]
        if len(fails) == 1:
            return seed, fails[0]
    raise AssertionError("no seed found")


def _run(tmp_path, tiny_llama_dir, name: str, extra: list[str]):
    over = tiny_scenario_overrides(tiny_llama_dir) + [
        f"data.num_clients={N}", f"federation.clients_per_round={N}", "federation.min_replies=2",
        "federation.num_rounds=1", "federation.evaluate_clients_per_round=0", "export.enabled=false", *extra]
    run = tmp_path / name
    simulate(fcfg.load("default", over), run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(run / "adapter" / "adapter_model.safetensors")), rows[-1]


@pytest.mark.parametrize("dropout", [False, True])
def test_secure_aggregate_equals_the_plain_aggregate(tmp_path, tiny_llama_dir, dropout):
    # Prepare: with dropout, one client raises while training, i.e. after it shared its keys
    extra = []
    if dropout:
        seed, failing = _one_failing_seed(0.2)
        extra = [f"seed={seed}", "simulation.fault_rate=0.2", "simulation.fault_kinds=[exception]"]
    # Execute
    plain, plain_row = _run(tmp_path, tiny_llama_dir, "plain", extra)
    secure, row = _run(tmp_path, tiny_llama_dir, "secure", extra + ["secure_aggregation.enabled=true"])
    # Assert: same clients, same sum (fixed point 2^-32 per client and coordinate)
    assert row["accepted"] == plain_row["accepted"] == (N - 1 if dropout else N)
    assert row["updated"]
    sa = row["secure_aggregation"]
    assert sa["survivors"] == row["accepted"] and sa["dropped_after_sharing"] == int(dropout)
    assert set(plain) == set(secure)
    moved = 0.0
    for k in plain:
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-8, err_msg=k)
        moved = max(moved, float(np.abs(plain[k]).max()))
    assert moved > 1e-4  # the round did train something
    assert row["train_loss"] == pytest.approx(plain_row["train_loss"], rel=1e-6)
    assert row["bytes_up_per_client"] > 0
