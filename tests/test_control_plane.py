"""The control plane is closed to devices, and devices run only app bundles the operator signed.

Attacks replayed (issue 11, item 1): a host holding only ``ca.crt`` (every device has it)
registers its own SuperNode key and submits a run through the address devices use; the
SuperLink submits an app bundle that the operator did not sign. The slow tests start real
Flower processes on loopback and stop each one by PID.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedge import appsign
from fedge import launch as D
from fedge.export import generate_keypair

# -- app bundle signatures (no processes) ----------------------------------------------------------


@pytest.fixture()
def keys(tmp_path):
    return generate_keypair(tmp_path / "op", name="op"), generate_keypair(tmp_path / "other", name="other")


def test_signature_is_ed25519_over_domain_and_bundle_hash(keys):
    # Prepare: a bundle's bytes and the operator's key
    op, _ = keys
    content = b"PK\x03\x04 some bundle"
    # Execute
    sig = appsign.sign_fab(content, op.private)
    signer, _, sig_hex = sig.partition(":")
    # Assert: the oracle is the definition: Ed25519 over DOMAIN || sha256(content), named by fingerprint
    from fedge.export.signing import load_public_key

    load_public_key(op.public_pem).verify(bytes.fromhex(sig_hex), appsign.DOMAIN + hashlib.sha256(content).digest())
    assert signer == op.fingerprint
    assert appsign.verify_fab(content, sig, op.public_pem) == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("case", ["unsigned", "empty", "foreign-signer", "bad-signature", "malformed"])
def test_refused_bundles(keys, case):
    # Prepare: the device pins the operator's key; the bundle arrives in one of the bad states
    op, other = keys
    content = b"PK\x03\x04 the operator's bundle"
    signature = {
        "unsigned": None,
        "empty": "",
        "foreign-signer": appsign.sign_fab(content, other.private),
        # signed by the operator, then one byte of the bundle changed
        "bad-signature": None,
        "malformed": op.fingerprint + ":zz",
    }[case]
    if case == "bad-signature":
        signature, content = appsign.sign_fab(content, op.private), content[:-1] + b"X"
    # Execute / Assert: refused, and the reason says which
    with pytest.raises(appsign.AppRefused) as err:
        appsign.verify_fab(content, signature, op.public_pem)
    assert err.value.reason == {"empty": "unsigned"}.get(case, case)


def test_foreign_key_claiming_the_operators_fingerprint_is_refused(keys):
    # Prepare: an attacker signs with its own key but writes the operator's fingerprint
    op, other = keys
    content = b"PK\x03\x04 attacker bundle"
    forged = op.fingerprint + ":" + appsign.sign_fab(content, other.private).partition(":")[2]
    # Execute / Assert: the fingerprint is only a label; the signature check is what refuses it
    with pytest.raises(appsign.AppRefused) as err:
        appsign.verify_fab(content, forged, op.public_pem)
    assert err.value.reason == "bad-signature"


def test_frozen_bundle_is_what_was_signed_even_if_the_app_changes(tmp_path, keys):
    # Prepare: an app, frozen and signed as fedge server does
    op, _ = keys
    app = _probe_app(tmp_path / "app")
    frozen, content = appsign.snapshot_app(app, tmp_path / "frozen")
    sig = appsign.sign_fab(content, op.private)
    # Execute: the live app is edited after signing (another engineer, a deploy script)
    (app / "probeapp" / "client.py").write_text(PROBE_CLIENT + "\n# edited\n")
    # Assert: the frozen copy still builds the signed bytes; the live directory no longer would
    assert appsign.verify_fab(appsign.fab_bytes(frozen), sig, op.public_pem) == hashlib.sha256(content).hexdigest()
    with pytest.raises(appsign.AppRefused):
        appsign.verify_fab(appsign.fab_bytes(app), sig, op.public_pem)


# -- the Fleet-only proxy (no SuperLink: refused paths never get forwarded) --------------------------


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-nodes",
                                  "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run",
                                  "/v1/fleet/get-run?x=/v1/control/start-run", "/v1/runtime/pull-app-inputs", "/",
                                  "/docs", "/v1/fleet/get-run/"])
def test_proxy_refuses_everything_but_fleet_paths(path):
    # Prepare: a proxy whose upstream is a closed port: a forwarded request would answer 502, not 404
    from starlette.testclient import TestClient

    from fedge.fleet_proxy import fleet_paths, make_app

    app = make_app(f"http://127.0.0.1:{D.free_port()}")
    # Execute
    with TestClient(app) as client:
        refused = client.post(path, content=b"x")
        forwarded = client.post("/v1/fleet/get-run", content=b"x")
        get = client.get("/v1/fleet/get-run")
    # Assert: the Control/Runtime paths and tricks are refused here; a Fleet path is forwarded (502: no upstream)
    assert refused.status_code == 404, (path, refused.text)
    assert forwarded.status_code == 502 and get.status_code == 404
    assert "/v1/fleet/get-run" in fleet_paths() and not any("/control/" in p for p in fleet_paths())


def _fedge_cli(*args: str, timeout: float = 180) -> tuple[int, str]:
    """``python -m fedge.cli ...`` in its own process group; killed by PID if it is still running at ``timeout``
    (the old code started a SuperLink / SuperNode here and waited forever)."""
    p = subprocess.Popen([sys.executable, "-m", "fedge.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)  # KeyboardInterrupt: its finally stops the processes it started
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        pytest.fail(f"fedge {args[0]} did not refuse; still running after {timeout:.0f} s")
    return p.returncode, out


def test_server_refuses_a_public_host_without_certificates(tmp_path):
    # Prepare / Execute: the operator forgets --certs on a public address
    rc, out = _fedge_cli("server", "default", "--host", "0.0.0.0", "--home", str(tmp_path / "srv"))
    # Assert: a clear error naming the option, nothing started
    assert rc == 2, out
    assert "--certs is required" in out
    assert not (tmp_path / "srv" / "superlink.log").exists()
    with pytest.raises(D.DeployError, match="SuperNode authentication cannot be turned off"):
        D.start_server(home=tmp_path / "srv2", host="0.0.0.0", certs=D.make_certs(tmp_path / "c"),
                       supernode_auth=False)


def test_client_on_a_remote_server_requires_the_pinned_key(tmp_path):
    # Prepare: a device's data file; the server is on another machine
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    # Execute: enrol without --trusted-key
    rc, out = _fedge_cli("client", "--server", "10.0.0.5:9093", "--data", str(data), "--device-id", "d",
                         "--home", str(tmp_path / "dev"))
    # Assert: refused before any SuperNode starts (it would run whatever bundle it is sent)
    assert rc == 2 and "--trusted-key" in out, out
    assert not (tmp_path / "dev" / "supernode.log").exists()


# -- real processes ---------------------------------------------------------------------------------


class Procs:
    def __init__(self):
        self.procs = []

    def close(self):
        for p in reversed(self.procs):
            D.stop(p)


@pytest.fixture()
def procs():
    p = Procs()
    yield p
    p.close()


@pytest.mark.slow
def test_ca_holder_cannot_register_a_key_or_submit_a_run_through_the_fleet_address(tmp_path, procs):
    # Prepare: fedge's server side on a public bind address (TLS; SuperNode auth not asked for)
    certs = D.make_certs(tmp_path / "certs")
    port = D.free_port()
    server = D.start_server(home=tmp_path / "srv", host="0.0.0.0", port=port, certs=certs)
    procs.procs += [server.link, server.proxy]
    operator = tmp_path / "operator-cli"
    D.write_connection(operator, "fedge", server.control_address, ca_cert=certs.ca_cert)
    app = _probe_app(tmp_path / "app")  # any bundle: the attacker's code
    # ... the attacker: a second host-side client with only ca.crt, aiming at the address devices use
    attacker = tmp_path / "attacker-cli"
    D.write_connection(attacker, "x", f"127.0.0.1:{port}", ca_cert=certs.ca_cert)
    intruder = D.make_node_keys(tmp_path / "keys", "intruder")
    # Execute: register its key, submit a run, and join as a SuperNode with that key / with no key
    reg = D.flwr(["supernode", "register", str(intruder.public_key), "x", "--format", "json"],
                 flwr_home=attacker, check=False)
    run = D.flwr(["run", str(app), "x", "--format", "json"], flwr_home=attacker, check=False)
    nodes = []
    for name, key in (("intruder", intruder.private_key), ("nokey", None)):
        nodes.append(D.start_supernode(superlink=f"127.0.0.1:{port}", home=tmp_path / name, node_config={},
                                       root_certificates=certs.ca_cert, auth_key=key, worker=False,
                                       clientappio_port=D.free_port()))
        procs.procs.append(nodes[-1])
    # Assert: both Control calls failed at the proxy; the SuperLink holds no node and no run
    for cp in (reg, run):
        out = D._json_out(cp.stdout)
        assert out["success"] is False and "404 Not Found" in out["error-message"], out
    assert D.list_nodes(connection="fedge", flwr_home=operator) == []
    listed = D._json_out(D.flwr(["list", "fedge", "--format", "json"], flwr_home=operator).stdout)
    assert listed.get("runs", []) == [], listed
    # ... authentication is on although only a public host was given: neither node gets in
    assert server.supernode_auth
    assert all(n.wait(60) != 0 for n in nodes)
    assert "must be registered" in (tmp_path / "nokey" / "supernode.log").read_text()


PROBE_SERVER = '''
import time
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict(), message_type="query", dst_node_id=n) for n in nodes]
    list(grid.send_and_receive(msgs, timeout=60))
'''

PROBE_CLIENT = '''
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    # what an attacker's bundle would do: run code on the device (here: leave a mark)
    Path(str(context.node_config["marker"])).write_text(str(context.run_id))
    return Message(RecordDict(), reply_to=msg)
'''


def _probe_app(root: Path) -> Path:
    """A minimal Flower app whose ClientApp writes the node's marker file when it runs."""
    (root / "probeapp").mkdir(parents=True, exist_ok=True)
    (root / "probeapp" / "__init__.py").write_text("")
    (root / "probeapp" / "server.py").write_text(PROBE_SERVER)
    (root / "probeapp" / "client.py").write_text(PROBE_CLIENT)
    (root / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "probeapp"
        version = "1.0.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "fedgetest"

        [tool.flwr.app.components]
        serverapp = "probeapp.server:app"
        clientapp = "probeapp.client:app"

        [tool.flwr.app.config]
        {appsign.RUN_APP_SIGNATURE} = ""
        '''))
    return root


def _wait_log(path: Path, text: str, timeout: float, proc) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text() if path.exists() else ""
        if text in log:
            return log
        assert proc.poll() is None, f"the SuperNode exited:\n{log[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s:\n{log[-3000:]}")


@pytest.mark.slow
def test_supernode_runs_only_bundles_the_operator_signed(tmp_path, procs):
    # Prepare: the server side, one registered device pinning the operator's key, a probe app
    certs = D.make_certs(tmp_path / "certs")
    op = generate_keypair(tmp_path / "op", name="op")
    other = generate_keypair(tmp_path / "other", name="other")
    server = D.start_server(home=tmp_path / "srv", port=D.free_port(), certs=certs, supernode_auth=True)
    procs.procs += [server.link, server.proxy]
    cli = tmp_path / "cli"
    D.write_connection(cli, "fedge", server.control_address, ca_cert=certs.ca_cert)
    dev = D.make_node_keys(tmp_path / "keys", "dev")
    D.register_node(dev.public_key, connection="fedge", flwr_home=cli)
    marker = tmp_path / "dev.ran"
    node = D.start_supernode(superlink=server.fleet_address, home=tmp_path / "dev",
                             node_config={"marker": str(marker)}, root_certificates=certs.ca_cert,
                             auth_key=dev.private_key, worker=False, clientappio_port=D.free_port(),
                             trusted_app_key=op.public_pem)
    procs.procs.append(node)
    app = _probe_app(tmp_path / "app")
    log = tmp_path / "dev" / "supernode.log"

    def submit(signature: str | None) -> int:
        args = ["run", str(app), "fedge", "--format", "json"]
        if signature is not None:
            args += ["--run-config", f'{appsign.RUN_APP_SIGNATURE}="{signature}"']
        return int(D._json_out(D.flwr(args, flwr_home=cli).stdout)["run-id"])

    # Execute / Assert: an unsigned bundle and one signed by another key are refused, nothing ran
    submit(None)
    _wait_log(log, "refused app bundle (unsigned)", 180, node)
    submit(appsign.sign_app(app, other.private))
    _wait_log(log, "refused app bundle (foreign-signer)", 180, node)
    assert not marker.exists()
    assert not list((tmp_path / "dev" / "flwr-home").rglob("probeapp")), "a refused bundle was installed"
    # ... the operator's signed bundle runs (its ClientApp leaves the mark with its run id)
    run_id = submit(appsign.sign_app(app, op.private))
    _wait_log(log, "signed by the pinned key: accepted", 180, node)
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists() and marker.read_text() == str(run_id)
    assert node.poll() is None
