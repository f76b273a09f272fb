"""Real deployments on loopback: SuperLink + SuperNodes as separate processes (fedge.launch).

Every test starts its own SuperLink on a free port, gives each process its own
FLWR_HOME and a neutral working directory, and stops every process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from fedge import launch as D
from tests.conftest import flower_processes, tiny_scenario_overrides

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parent.parent
ROUND_TIMEOUT_S = 90  # a dead node costs at most this much per round


@pytest.fixture(scope="module")
def tiny_scenario(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny scenario as one YAML the ServerApp and the ClientApps read (no local evaluation)."""
    path = tmp_path_factory.mktemp("scenario") / "tiny.yaml"
    return D.write_scenario(path, "default", tiny_scenario_overrides(tiny_llama_dir) + [
        "federation.evaluate_clients_per_round=0", f"federation.round_timeout_s={ROUND_TIMEOUT_S}"])


class Cluster:
    """The processes of one test; ``close`` stops them all and checks that none is left."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list = []
        self.port = D.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_home = root / "cli"

    def superlink(self, **kw):
        p = D.start_superlink(port=self.port, home=self.root / "superlink", **kw)
        self.procs.append(p)
        return p

    def node(self, name: str, node_config: dict, **kw):
        p = D.start_supernode(superlink=self.address, home=self.root / name, node_config=node_config,
                              clientappio_port=D.free_port(), **kw)
        self.procs.append(p)
        return p

    def shop(self, i: int, n: int = 3, **kw):
        return self.node(f"shop-{i}", {"partition-id": i, "num-partitions": n, "device-id": f"shop-{i}"}, **kw)

    def online(self) -> list[dict]:
        return [n for n in D.list_nodes(connection="fedge", flwr_home=self.cli_home) if n["status"] == "online"]

    def wait_online(self, k: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(nodes := self.online()) < k and time.monotonic() < deadline:
            time.sleep(1)
        return nodes

    def close(self) -> None:
        for p in reversed(self.procs):
            D.stop(p)
        groups = {p.pid for p in self.procs}
        left = []
        for pid in flower_processes():
            try:
                if os.getpgid(pid) in groups:
                    left.append(psutil.Process(pid).cmdline()[:2])
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        assert not left, f"Flower processes left running: {left}"


@pytest.fixture()
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def _assert_two_full_rounds(rows: list[dict], clients: int = 3) -> None:
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["accepted"] == clients and r["rejected"] == 0 and r["updated"], r


def test_loopback_deployment_runs_two_rounds(cluster, tiny_scenario, tmp_path):
    # Prepare: an insecure SuperLink and 3 SuperNodes, each with its own node config
    cluster.superlink()
    for i in range(3):
        cluster.shop(i)
    D.write_connection(cluster.cli_home, "fedge", cluster.address)
    # Execute: submit the app in the repository with the scenario and run dir in the run config
    t0 = time.monotonic()
    D.submit_run(APP_DIR, connection="fedge", flwr_home=cluster.cli_home, scenario=tiny_scenario,
                 run_dir=tmp_path / "out")
    rows = D.wait_for_rounds(tmp_path / "out", 2, timeout=600, procs=cluster.procs)
    summary = D.wait_for_summary(tmp_path / "out")
    # Assert: both rounds used all three devices; the final adapter and report are written
    _assert_two_full_rounds(rows)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert summary["rounds"] == 2
    print(json.dumps({"deployment_round_seconds": [r["seconds"] for r in rows],
                      "submit_to_round2_s": time.monotonic() - t0}))


def test_tls_refuses_nodes_without_the_ca(cluster, tmp_path):
    # Prepare: a TLS SuperLink; the CLI trusts its CA
    certs = D.make_certs(tmp_path / "certs")
    cluster.superlink(certs=certs)
    D.write_connection(cluster.cli_home, "fedge", cluster.address, ca_cert=certs.ca_cert)
    # Execute: a plaintext node, a TLS node that only trusts the system CAs, a node with the CA
    plain = cluster.node("plain", {"partition-id": 0}, insecure=True)
    no_ca = cluster.node("no-ca", {"partition-id": 1}, insecure=False)
    good = cluster.node("good", {"partition-id": 2}, root_certificates=certs.ca_cert)
    online = cluster.wait_online(1)
    time.sleep(5)  # give the refused nodes time to (not) appear
    # Assert: only the node with the CA joined; the one without it gave up on certificate verification
    assert len(cluster.online()) == 1 and len(online) == 1
    assert no_ca.wait(30) != 0  # gave up: it cannot verify the SuperLink's certificate
    assert plain.poll() is None and good.poll() is None  # the plaintext node keeps retrying, never admitted


def test_tls_and_node_auth_deployment_runs_two_rounds(cluster, tiny_scenario, tmp_path):
    # Prepare: TLS + SuperNode authentication; 3 registered device keys and one unregistered key
    certs = D.make_certs(tmp_path / "certs")
    keys = [D.make_node_keys(tmp_path / "keys", f"shop-{i}") for i in range(3)]
    intruder = D.make_node_keys(tmp_path / "keys", "intruder")
    cluster.superlink(certs=certs, enable_supernode_auth=True)
    D.write_connection(cluster.cli_home, "fedge", cluster.address, ca_cert=certs.ca_cert)
    ids = {D.register_node(k.public_key, connection="fedge", flwr_home=cluster.cli_home, name=f"shop-{i}")
           for i, k in enumerate(keys)}
    # Execute: the three shops, a node with an unregistered key, a node with no key
    for i, k in enumerate(keys):
        cluster.shop(i, root_certificates=certs.ca_cert, auth_key=k.private_key)
    bad = cluster.node("intruder", {"partition-id": 0, "device-id": "intruder"},
                       root_certificates=certs.ca_cert, auth_key=intruder.private_key)
    nokey = cluster.node("nokey", {"partition-id": 1, "device-id": "nokey"}, root_certificates=certs.ca_cert)
    D.submit_run(APP_DIR, connection="fedge", flwr_home=cluster.cli_home, scenario=tiny_scenario,
                 run_dir=tmp_path / "out")
    rows = D.wait_for_rounds(tmp_path / "out", 2, timeout=600, procs=cluster.procs[:4])
    # Assert: the refused nodes exited, only the registered ids are online, both rounds had all 3 shops
    assert bad.wait(30) != 0 and nokey.wait(30) != 0
    assert {int(n["node-id"]) for n in cluster.online()} == ids  # neither refused node ever got a node id
    _assert_two_full_rounds(rows)


def _kill_group(proc) -> None:
    """Power loss: SIGKILL the SuperNode and its ClientApp processes, no goodbye to the SuperLink."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def test_node_dying_mid_round_does_not_stall_the_federation(cluster, tiny_scenario, tmp_path):
    # Prepare: 3 shops on an insecure loopback SuperLink
    cluster.superlink()
    for i in range(3):
        cluster.shop(i)
    D.write_connection(cluster.cli_home, "fedge", cluster.address)
    D.submit_run(APP_DIR, connection="fedge", flwr_home=cluster.cli_home, scenario=tiny_scenario,
                 run_dir=tmp_path / "out")
    # Execute: once the server has sent round 1's train messages (its progress file), cut shop-2's power:
    # whether or not shop-2 pulled its message, the server waits for a reply that never comes
    progress = tmp_path / "out" / "progress.json"
    deadline = time.monotonic() + 300
    while (json.loads(progress.read_text()) if progress.exists() else {}).get("phase") != "train":
        assert time.monotonic() < deadline, "the server never started round 1"
        time.sleep(0.2)
    killed_at = time.monotonic()
    _kill_group(cluster.procs[3])
    rows = D.wait_for_rounds(tmp_path / "out", 1, timeout=ROUND_TIMEOUT_S + 240, procs=cluster.procs[:3])
    round1_done = time.monotonic()
    # ... and bring it back (a fresh node id, same device name and partition)
    cluster.shop(2)
    rows = D.wait_for_rounds(tmp_path / "out", 2, timeout=ROUND_TIMEOUT_S + 400, procs=cluster.procs[:3])
    # Assert: round 1 completed with the other two (no stall past the timeout), round 2 had all three
    assert rows[1]["sampled"] == 3 and rows[1]["accepted"] == 2 and rows[1]["updated"], rows[1]
    assert round1_done - killed_at < ROUND_TIMEOUT_S + 120
    assert rows[2]["accepted"] == 3, rows[2]
    print(json.dumps({"round1_after_kill_s": round1_done - killed_at, "round_seconds": [r["seconds"] for r in rows]}))
