"""``fedge bench strategies`` end to end on the tiny causal scenario (Flower simulation engine)."""

import csv
import json

import numpy as np
import pytest
import yaml

from simulations import bench
from tests.conftest import tiny_scenario_overrides


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_bench_strategies_two_strategies_two_seeds(tmp_path, tiny_llama_dir):
    # Prepare: 2 of 3 clients per round, so the seeded sampling matters; FedProx with
    # μ = 0 is FedAvg, so with shared partitions, sampling, initialisation and local
    # batches the two must give the same curves; Krum (f=1 needs 5 clients) must fail.
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text("name: tiny-bench\nseed: 0\n")
    sets = tiny_scenario_overrides(tiny_llama_dir) + [
        "federation.clients_per_round=2", "federation.evaluate_clients_per_round=0", "train.lr=0.01"]
    argv = ["strategies", "--config", str(scenario), "--strategies", "fedavg,fedprox,krum", "--seeds", "2",
            "--param", "fedprox.mu=0", "--param", "krum.f=1", "--out", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    # Execute
    rc = bench.main(argv)
    # Assert: reports exist; krum is reported as failed, the others ran both seeds
    out = tmp_path / "out"
    assert rc == 1  # one strategy failed
    for ext in ("md", "csv", "png"):
        assert (out / f"strategies.{ext}").stat().st_size > 0
    assert (out / "strategies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["strategy"]: r for r in csv.DictReader(open(out / "strategies.csv"))}
    assert set(rows) == {"fedavg", "fedprox", "krum"}
    assert rows["krum"]["status"] == "failed" and "2f+3" in rows["krum"]["error"]
    assert (rows["krum"]["seeds_ok"], rows["krum"]["seeds_total"]) == ("0", "2")
    md = (out / "strategies.md").read_text()
    assert "| krum |" in md and "failed: StrategyError" in md and "fedge bench strategies --config" in md
    assert not (out / "krum").exists()  # refused before any runtime started
    for name in ("fedavg", "fedprox"):
        r = rows[name]
        assert r["status"] == "ok" and r["seeds_ok"] == "2" and r["metric"] == "central_loss"
        finals = [_metrics(out / name / f"seed-{k}")[-1]["central_loss"] for k in (0, 1)]
        assert [m["round"] for m in _metrics(out / name / "seed-0")] == [0, 1, 2]
        # mean ± sample std (n − 1) over the 2 seeds, from the runs' own metrics
        assert float(r["final_mean"]) == pytest.approx(np.mean(finals), rel=1e-9)
        assert float(r["final_std"]) == pytest.approx(np.std(finals, ddof=1), rel=1e-9)
        assert float(r["final_std"]) > 0
        assert 0 <= int(r["best_round"]) <= 2 and float(r["bytes_up_per_client_round"]) > 0
        assert float(r["wall_s_mean"]) > 0
    # The per-strategy parameter reached that strategy only
    assert json.loads(rows["fedprox"]["params"]) == {"mu": 0}
    for name, want in (("fedprox", {"mu": 0}), ("fedavg", {})):
        for k in (0, 1):
            run_cfg = yaml.safe_load((out / name / f"seed-{k}" / "config.yaml").read_text())
            assert run_cfg["strategy"] == {"name": name, "params": want} and run_cfg["seed"] == k
    # Same seed -> same partitions, initial adapter, sampled clients and batches across strategies:
    # round 0 is identical, and FedProx(μ=0) reproduces FedAvg round by round.
    for k in (0, 1):
        a, b = _metrics(out / "fedavg" / f"seed-{k}"), _metrics(out / "fedprox" / f"seed-{k}")
        assert a[0]["central_loss"] == b[0]["central_loss"]
        np.testing.assert_allclose([x["central_loss"] for x in a], [x["central_loss"] for x in b], rtol=1e-6)
        np.testing.assert_allclose([x["train_loss"] for x in a[1:]], [x["train_loss"] for x in b[1:]], rtol=1e-6)
    # ... while another seed gives another split and initialisation
    assert _metrics(out / "fedavg" / "seed-0")[0]["central_loss"] != _metrics(out / "fedavg" / "seed-1")[0]["central_loss"]


def test_param_must_name_a_benchmarked_strategy(tmp_path, capsys):
    # Prepare / Execute
    rc = bench.main(["strategies", "--strategies", "fedavg", "--param", "fedprox.mu=0.1", "--out", str(tmp_path)])
    # Assert: refused before loading anything
    assert rc == 2 and "not in --strategies" in capsys.readouterr().err


def test_summary_statistics_oracle():
    # Prepare: two seeds with known curves (accuracy: higher is better)
    def rows(acc, up):
        return [{"round": 0, "central_accuracy": 0.1, "central_loss": 3.0}] + [
            {"round": t, "central_accuracy": a, "central_loss": 2.0, "bytes_up_per_client": up,
             "bytes_down_per_client": 200} for t, a in enumerate(acc, 1)]

    runs = [bench.SeedRun(seed=0, wall_seconds=10.0, rows=rows([0.5, 0.4], 100)),
            bench.SeedRun(seed=1, wall_seconds=20.0, rows=rows([0.7, 0.6], 300))]
    # Execute
    row = bench.summarize(bench.StrategyResult(name="x", params={}, runs=runs), "central_accuracy")
    # Assert: closed forms
    assert row["final_mean"] == pytest.approx(0.5) and row["final_std"] == pytest.approx(np.sqrt(0.02))
    assert row["best_round"] == 1 and row["best_mean"] == pytest.approx(0.6)
    assert row["bytes_up_per_client_round"] == pytest.approx(200) and row["wall_s_mean"] == pytest.approx(15)
    # A failed seed makes the row partial; all failed makes it failed with the reason
    runs.append(bench.SeedRun(seed=2, error="RuntimeError: boom"))
    assert bench.summarize(bench.StrategyResult("x", {}, runs=runs), "central_accuracy")["status"] == "partial"
    row = bench.summarize(bench.StrategyResult("x", {}, runs=[runs[-1]]), "central_accuracy")
    assert row["status"] == "failed" and row["error"] == "RuntimeError: boom"


def test_paired_difference_is_per_seed():
    # Prepare: b beats a by exactly 0.1 at every seed although the seeds differ a lot
    def res(name, finals):
        runs = [bench.SeedRun(seed=k, rows=[{"round": 1, "central_loss": v}]) for k, v in enumerate(finals)]
        return bench.StrategyResult(name, {}, runs=runs)

    a, b = res("a", [1.0, 3.0, 5.0]), res("b", [0.9, 2.9, 4.9])
    # Execute
    mean, std = bench.paired_difference(b, a, "central_loss")
    # Assert: the paired std is 0, the unpaired one is 2
    assert mean == pytest.approx(-0.1) and std == pytest.approx(0.0, abs=1e-12)
    assert bench.summarize(b, "central_loss")["final_std"] == pytest.approx(2.0)
