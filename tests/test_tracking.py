"""TensorBoard and MLflow get every round's metrics (read back with each tool's own reader)."""

from __future__ import annotations

import pytest

from fedge import config as fcfg
from fedge.tracking import Tracker, scalars

ROWS = [{"round": 0, "central_loss": 4.5, "central_accuracy": None, "seconds": 3.0},
        {"round": 1, "central_loss": 3.25, "train_loss": 3.5, "rejected": 0, "updated": True,
         "rejected_reasons": [], "bytes_up": 1024, "epsilon_user": 0.75, "seconds": 10.0},
        {"round": 2, "central_loss": 2.5, "train_loss": 2.75, "rejected": 1, "updated": True,
         "rejected_reasons": ["nan"], "bytes_up": 1024, "epsilon_user": 1.25, "seconds": 9.0}]


def _expected() -> dict[str, dict[int, float]]:
    """key -> {round: value}, the numeric columns of ROWS (booleans and lists are not metrics)."""
    out: dict[str, dict[int, float]] = {}
    for r in ROWS:
        for k, v in r.items():
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[r["round"]] = float(v)
    return out


def test_scalars_drop_flags_lists_and_missing_values():
    assert scalars(ROWS[2]) == {"central_loss": 2.5, "train_loss": 2.75, "rejected": 1.0, "bytes_up": 1024.0,
                                "epsilon_user": 1.25, "seconds": 9.0}


def test_tensorboard_event_file_has_every_round(tmp_path):
    # Prepare
    cfg = fcfg.load("default", [f"run_root={tmp_path}", "tracking.tensorboard=true"])
    run_dir = tmp_path / "run"
    # Execute
    tr = Tracker(cfg, run_dir)
    for r in ROWS:
        tr.log(r)
    tr.close()
    # Assert: TensorBoard's own reader finds each metric at each round's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    want = _expected()
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    for key, by_round in want.items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(by_round), key


def test_mlflow_file_store_has_every_round(tmp_path):
    pytest.importorskip("mlflow", reason="tracking.mlflow is the optional 'mlflow' extra (pip install 'fedge[mlflow]')")
    # Prepare
    cfg = fcfg.load("default", [f"run_root={tmp_path}", "tracking.mlflow=true"])
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "report.md").write_text("# report\n")
    # Execute
    tr = Tracker(cfg, run_dir)
    for r in ROWS:
        tr.log(r)
    tr.close()
    # Assert: the store under <run_root>/mlruns holds one finished run with every metric at every round
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("default")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["strategy"] == "fedavg" and run.data.params["rounds"] == "3"
    for key, by_round in _expected().items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx(by_round), key
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.md"]


def test_mlflow_missing_extra_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **kw):  # the extra not installed
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    cfg = fcfg.load("default", [f"run_root={tmp_path}", "tracking.mlflow=true"])
    with pytest.raises(fcfg.ConfigError, match=r"tracking.mlflow needs the optional extra"):
        Tracker(cfg, tmp_path / "run")


def test_mlflow_run_of_a_crashed_federation_is_failed_not_running(tmp_path, tiny_llama_dir, torch_one_thread):
    pytest.importorskip("mlflow", reason="tracking.mlflow is the optional 'mlflow' extra (pip install 'fedge[mlflow]')")
    from mlflow.tracking import MlflowClient

    from server.federation import run_federation
    from tests.conftest import tiny_scenario_overrides

    # Prepare: a run that dies after its first metrics row (the round-0 evaluation)
    cfg = fcfg.load("default", [*tiny_scenario_overrides(tiny_llama_dir), f"run_root={tmp_path}",
                                "tracking.mlflow=true", "export.enabled=false"])

    def crash(row):
        raise RuntimeError("operator pressed ctrl-c")

    # Execute
    with pytest.raises(RuntimeError, match="ctrl-c"):
        run_federation(None, cfg, tmp_path / "run", on_round=crash)
    # Assert: the tracker closed the run as FAILED, with the round-0 metric it got
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "central_loss")] == [0]
