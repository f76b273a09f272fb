"""Flower ServerApp: builds the strategy from the scenario and runs the rounds.

The scenario comes from the run config (``flwr run . --run-config "scenario='x'"``)
or is pinned by ``fedge simulate`` through :func:`make_app`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge import config as fcfg
from fedge import protocol as P
from server.federation import run_federation


def new_run_dir(cfg: fcfg.RunConfig) -> Path:
    """``<run_root>/<UTC time>-<scenario>-<config digest>``: unique and sortable."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(cfg.run_root) / f"{stamp}-{cfg.name}-{cfg.digest()[:6]}"


def make_app(
    config_path: str | None = None,
    run_dir: str | Path | None = None,
    on_round: Callable[[dict], None] | None = None,
    result: dict | None = None,
    resume: bool = False,
    force: bool = False,
) -> ServerApp:
    """A ServerApp; arguments pin what ``fedge simulate`` decided, else the run config decides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config_path:
            cfg = fcfg.load(config_path)
        else:
            rc = context.run_config
            overrides = [s for s in str(rc.get(P.RUN_OVERRIDES, "")).split(";") if s.strip()]
            cfg = fcfg.load(str(rc.get(P.RUN_SCENARIO, "default")), overrides)
        where = run_dir or str(context.run_config.get(P.RUN_DIR, "") or "")
        resume_run = resume or bool(context.run_config.get(P.RUN_RESUME, False))
        try:
            summary = run_federation(grid, cfg, Path(where) if where else new_run_dir(cfg), on_round=on_round,
                                     resume=resume_run, force=force)
        except Exception as err:
            if result is not None:  # fedge simulate re-raises it after the engine has stopped
                result["error"] = err
            raise
        if result is not None:
            result.update(summary)

    return app


app = make_app()
