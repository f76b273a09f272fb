"""A device that missed a deployment gets the published artifact when it next joins a run."""

import json

import pytest

from fedge import config as fcfg
from fedge import protocol as P
from fedge.runtime.store import current, installed_versions
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def test_devices_behind_the_published_artifact_catch_up_in_the_next_run(tmp_path, tiny_llama_dir):
    # Prepare: one server (one run root: one signing key, one published artifact)
    over = tiny_scenario_overrides(tiny_llama_dir) + [f"run_root={tmp_path / 'runs'}", "federation.num_rounds=2",
                                                      "federation.evaluate_clients_per_round=0", "export.catch_up=true"]
    cfg = fcfg.load("default", over)
    simulate(cfg, tmp_path / "runs" / "first")
    first = json.loads((tmp_path / "runs" / "first" / "deployment.json").read_text())
    assert first["version"] == 1 and first["installed"] == 3
    # Execute: the next run's devices hold nothing yet (simulated devices keep their state per run),
    # like devices that were offline when v1 went out
    simulate(cfg, tmp_path / "runs" / "second")
    rows = [json.loads(x) for x in (tmp_path / "runs" / "second" / "metrics.jsonl").read_text().splitlines()]
    second = json.loads((tmp_path / "runs" / "second" / "deployment.json").read_text())
    # Assert: round 1 brought every device to v1 (once: not again in round 2); the run then deployed v2
    caught = rows[1]["caught_up"]
    assert sorted(caught) == [f"partition-{i:06d}" for i in range(3)]
    assert all(d[P.DEPLOY_VERSION] == 1 and "refused" not in d for d in caught.values())
    assert "caught_up" not in rows[2]
    assert second["version"] == 2 and second["installed"] == 3
    for name in caught:
        store = tmp_path / "runs" / "second" / "client-state" / name / "models"
        assert current(store) == 2 and installed_versions(store) == [1, 2]  # v1 kept for rollback
