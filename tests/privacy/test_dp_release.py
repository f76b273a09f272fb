"""What a user-level DP run publishes (issue #11.4) and where its secrets stay (#11.3, #11.5):
a real, short simulation through Flower's engine."""

from __future__ import annotations

import json
import logging
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge import config as fcfg
from fedge.privacy import accounting
from server import checkpoint
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow
WITHHELD = ("sampled", "accepted", "rejected", "failed", "updated", "train_loss", "local_eval_loss", "local_eval_accuracy",
            "bytes_up", "bytes_down", "delta_norm_mean")


def test_user_level_run_publishes_no_unnoised_client_statistic(tmp_path, tiny_llama_dir, caplog, capsys):
    # Prepare: 4 clients, Poisson q = 2/4, 2 rounds, local evaluation on; one client sends NaN-free but
    # real train losses that the server sees (they are the oracle: none of them may be published)
    over = ["data.num_clients=4", "federation.clients_per_round=2", "federation.min_replies=1",
            "federation.evaluate_clients_per_round=2", "privacy.user_level.enabled=true",
            "privacy.user_level.noise_multiplier=1.0", "privacy.user_level.clip_norm=0.05",
            "privacy.user_level.delta=1e-3"]
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + over)
    run = tmp_path / "run"
    lines: list[str] = []
    # Execute
    with caplog.at_level(logging.DEBUG, logger="fedge"):
        simulate(cfg, run, on_round=lambda row: lines.append(json.dumps(row)))
    published = "\n".join([(run / f).read_text() for f in ("metrics.jsonl", "report.md", "summary.json",
                                                              "privacy.json")] + lines + [caplog.text,
                                                                                          capsys.readouterr().out])
    # The server's private view of each round, from its checkpoints (the only place it is kept)
    ck = {r: checkpoint._read(run / "checkpoints" / f"round-{r:04d}") for r in (1, 2)}
    trained = [ck[r].extra["trained"] for r in (1, 2)]
    losses = [t["train_loss"] for t in trained if t["train_loss"] is not None]
    # Assert: the clients did report losses to the server (else the check below is empty) ...
    assert sum(t["accepted"] for t in trained) > 0 and losses
    # ... and no unnoised client statistic reached metrics.jsonl, the report, the log or stdout
    for loss in losses:
        assert repr(loss) not in published and f"{loss:.4f}" not in published
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert all(r[k] is None for k in WITHHELD if k in r) and r["rejected_reasons"] == []
        assert "secure_aggregation" not in r
        assert r["central_loss"] is not None  # the server's own test set: public
    # What is published is accounted: ε per round from the Poisson accountant (add/remove, q = m/N)
    expected = accounting.user_level_epsilon(noise_multiplier=1.0, clients_per_round=2, num_clients=4, rounds=2,
                                             delta=1e-3, sampling="poisson")
    assert rows[-1]["epsilon_user"] == pytest.approx(expected, rel=1e-9)
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["client_sampling"] == "poisson" and privacy["cohort"].startswith("secret")
    # Secret cohorts: in the checkpoint only, files 0600; the cohort's client names are not published
    cohorts = ck[2].extra["cohorts"]
    assert set(cohorts) == {"1", "2"}
    for name in {c for v in cohorts.values() for c in v}:
        assert name not in (run / "metrics.jsonl").read_text()
    for f in (run / "checkpoints" / "round-0002").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # #11.5: each release was charged and checkpointed with its round (before evaluation clients got it)
    assert [json.loads(ck[r].extra["ledger"])["events"][-1]["round"] for r in (1, 2)] == [1, 2]

    # Resume after a crash between the release of round 2 and its metrics row (what a kill during
    # evaluation leaves): the round is reported from the checkpoint, not trained and released again.
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:-1]) + "\n")
    simulate(fcfg.load(run / "config.yaml"), run, resume=True)  # the run's own config, as `--resume` does
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(again) == len(metrics) and again[-1]["round"] == 2
    measured = ("seconds", "server_rss_mb")
    assert {k: v for k, v in again[-1].items() if k not in measured} == \
        {k: v for k, v in json.loads(metrics[-1]).items() if k not in measured}
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == resumed.keys() and all(np.array_equal(adapter[k], resumed[k]) for k in adapter)
    after = checkpoint.load_latest(run)
    assert after.round == 2 and after.extra["ledger"] == ck[2].extra["ledger"]  # charged once
    assert after.extra["cohorts"] == cohorts


def test_seeded_cohorts_and_mode_for_a_non_dp_run(tmp_path, tiny_llama_dir):
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + ["federation.num_rounds=1"])
    run = tmp_path / "run"
    simulate(cfg, run)
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["cohort"].startswith("seeded")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert row["accepted"] is not None and row["train_loss"] is not None  # research runs keep their detail
