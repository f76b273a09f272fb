"""Per-round metrics where researchers already look: TensorBoard and MLflow (both local, offline).

    tracking.tensorboard: true   event files in <run_dir>/tensorboard/ (tensorboard --logdir runs/)
    tracking.mlflow: true        a run in the local MLflow file store (default <run_root>/mlruns;
                                 mlflow ui --backend-store-uri <that dir>); needs fedge[mlflow]

Every numeric column of a metrics.jsonl row is logged as a scalar at step = round.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from fedge import config as fcfg


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numeric columns (booleans, lists and None left out), except the step itself."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """Sinks opened at the start of a run; ``log`` once per round; ``close`` at the end."""

    def __init__(self, cfg: fcfg.RunConfig, run_dir: Path):
        tr = cfg.tracking
        self.run_dir = Path(run_dir)
        self.tb = None
        self.mlflow = None
        if tr.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise fcfg.ConfigError(f"tracking.tensorboard needs the 'tensorboard' package ({err})") from None
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if tr.mlflow:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError:
                raise fcfg.ConfigError("tracking.mlflow needs the optional extra: pip install 'fedge[mlflow]' "
                                       "(mlflow-skinny)") from None
            uri = tr.mlflow_uri or (Path(cfg.run_root).resolve() / "mlruns").as_uri()
            if uri.startswith("file:"):
                # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the one
                # backend the skinny client has without SQLAlchemy (a sqlite:// URI needs full mlflow).
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow = MlflowClient(tracking_uri=uri)
            name = tr.mlflow_experiment or cfg.name
            exp = self.mlflow.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.mlflow.create_experiment(name)
            run = self.mlflow.create_run(exp_id, run_name=self.run_dir.name,
                                         tags={"fedge.run_dir": str(self.run_dir.resolve())})
            self.mlflow_run_id = run.info.run_id
            self.mlflow_uri = uri
            params = {"scenario": cfg.name, "strategy": cfg.strategy.name, "model": cfg.model.source,
                      "rounds": cfg.federation.num_rounds, "clients_per_round": cfg.federation.clients_per_round,
                      "lora_r": cfg.lora.r, "lr": cfg.train.lr, "local_steps": cfg.train.local_steps,
                      "encoding": cfg.federation.encoding, "dp_sgd": cfg.privacy.dp_sgd.enabled,
                      "user_level_dp": cfg.privacy.user_level.enabled, "config_digest": cfg.digest()[:12]}
            for k, v in params.items():
                self.mlflow.log_param(self.mlflow_run_id, k, str(v))

    def log(self, row: dict) -> None:
        values, step = scalars(row), int(row["round"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()  # a TensorBoard open on the run shows each round as it lands
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run_id,
                                  metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, *, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            for name in ("report.md", "summary.json", "config.yaml"):
                if (self.run_dir / name).exists():
                    self.mlflow.log_artifact(self.mlflow_run_id, str(self.run_dir / name))
            if (self.run_dir / "plots").is_dir():
                self.mlflow.log_artifacts(self.mlflow_run_id, str(self.run_dir / "plots"), "plots")
            self.mlflow.set_terminated(self.mlflow_run_id, status="FAILED" if failed else "FINISHED")
            self.mlflow = None
