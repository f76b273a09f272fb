"""``simulation.ray_address``: a simulation attached to a Ray cluster started with ``ray start``.

The head is a real one (``ray start --head`` in a temporary directory, on free ports); it is
stopped by PID: every process it started carries a tag in its environment, and only those
are ended (``ray stop`` would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedge import config as fcfg
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
TAG = "FEDGE_TEST_RAY_HEAD"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _head_processes(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(TAG) == tag:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.fixture()
def ray_head():
    """(address, temp dir) of a fresh single-node Ray cluster; its processes are ended afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # short: Ray's unix socket paths live under it
    tag = os.urandom(6).hex()
    env = {**os.environ, TAG: tag}
    cmd = [
        str(RAY),
        "start",
        "--head",
        f"--port={_free_port()}",
        f"--temp-dir={temp}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        address = (temp / "ray_current_cluster").read_text().strip()
        yield address, temp
    finally:
        procs = _head_processes(tag)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulation_runs_on_an_existing_ray_cluster(ray_head, tmp_path, tiny_llama_dir):
    # Prepare: the tiny two-round scenario, attached to the head's address
    address, temp = ray_head
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [f"simulation.ray_address={address}"])
    # Execute
    summary = simulate(cfg, tmp_path / "run")
    # Assert: the run completed, every round with every sampled client
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert all(r["accepted"] == 3 and r["updated"] for r in lines[1:])
    assert summary["final_central_loss"] < summary["initial_central_loss"]
    # ... its clients ran as actors of that cluster (a local Ray would log under /tmp/ray, not here)
    logs = list((temp / "session_latest" / "logs").glob("worker-*.out"))
    assert any(":actor_name:ClientAppActor" in f.read_text(errors="replace") for f in logs)
    # ... and the clients' environment reached the cluster's workers: each virtual device found
    # its state directory (FEDGE_CLIENT_STATE) and installed the deployed artifact there
    dep = json.loads((tmp_path / "run" / "deployment.json").read_text())
    assert dep["installed"] == 3
    from fedge.runtime.store import current

    for name in dep["devices"]:
        assert current(tmp_path / "run" / "client-state" / name / "models") == dep["version"]
    # The cluster outlives the run: a driver can still attach to it
    assert _head_processes_alive(temp)


def _head_processes_alive(temp: Path) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(
            str(temp) in " ".join(p.info["cmdline"] or []) and "gcs_server" in " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["cmdline"])
        ):
            return True
        time.sleep(0.2)
    return False


def test_an_unreachable_address_is_a_config_error(tmp_path, tiny_llama_dir):
    cfg = fcfg.load(
        "default", tiny_scenario_overrides(tiny_llama_dir) + [f"simulation.ray_address=127.0.0.1:{_free_port()}"]
    )
    with pytest.raises(fcfg.ConfigError, match="simulation.ray_address"):
        simulate(cfg, tmp_path / "run")
