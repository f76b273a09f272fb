"""`fedge server` + `fedge client` as an operator runs them: TLS, registered device keys, own data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedge import config as fcfg
from fedge.launch import free_port
from tests.conftest import flower_processes, tiny_scenario_overrides

pytestmark = pytest.mark.slow


def _fedge(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedge.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_operator_commands_run_a_tls_authenticated_federation(tmp_path, tiny_llama_dir):
    # Prepare: certificates, two device keys, each device's own data file, the scenario
    for args in (("certs", "--out", tmp_path / "certs"),
                 ("keys", "node", "--name", "shop-0", "--dir", tmp_path / "keys"),
                 ("keys", "node", "--name", "shop-1", "--dir", tmp_path / "keys")):
        p = _fedge(*args)
        assert p.wait(timeout=120) == 0, p.stdout.read()
    for i in range(2):
        (tmp_path / f"shop-{i}.jsonl").write_text("".join(
            json.dumps({"prompt": f"where is item {k} in shop {i}?", "response": f"aisle {k % 7}"}) + "\n"
            for k in range(20)))
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [
        "data.num_clients=2", "federation.clients_per_round=2", "federation.evaluate_clients_per_round=0",
        "federation.min_replies=2", f"export.private_key={tmp_path / 'sign' / 'fedge.key'}"])
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(fcfg.dump_yaml(cfg))
    port = free_port()
    run_dir = tmp_path / "run"
    # Execute: the server, then two devices
    server = _fedge("server", scenario, "--home", tmp_path / "srv", "--port", port, "--certs", tmp_path / "certs",
                    "--register", tmp_path / "keys" / "shop-0.pub", "--register", tmp_path / "keys" / "shop-1.pub",
                    "--run-dir", run_dir)
    for line in server.stdout:  # devices start once their keys are registered and the run is submitted
        if "submitted" in line:
            break
    else:
        pytest.fail("fedge server exited before submitting the run")
    devices = [
        _fedge("client", "--server", f"127.0.0.1:{port}", "--data", tmp_path / f"shop-{i}.jsonl",
               "--device-id", f"shop-{i}", "--home", tmp_path / f"dev{i}", "--root-certificates",
               tmp_path / "certs" / "ca.crt", "--auth-key", tmp_path / "keys" / f"shop-{i}",
               "--state-dir", tmp_path / f"state{i}", "--clientappio-port", free_port(),
               "--trusted-key", tmp_path / "sign" / "fedge.pub")
        for i in range(2)]
    try:
        out, _ = server.communicate(timeout=600)
    finally:
        for proc in (*devices, server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (*devices, server):
            proc.wait(timeout=60)
    # Assert: two rounds with both devices, the artifact installed on both, nothing left running
    assert server.returncode == 0, out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["accepted"] for r in rows] == [2, 2], rows
    dep = json.loads((run_dir / "deployment.json").read_text())
    assert sorted(dep["devices"]) == ["shop-0", "shop-1"] and dep["installed"] == 2
    assert "round   2" in out
    time.sleep(2)
    assert not [p for p in flower_processes() if os.getpgid(p) in {server.pid, *(d.pid for d in devices)}]
