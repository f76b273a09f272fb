"""The client's deploy handler: a tampered artifact is refused and the installed model kept."""

import json
import shutil

from flwr.app import Context, Message, RecordDict

import clients.app
from fedge import config as fcfg
from fedge import deltas
from fedge import protocol as P
from fedge.export import artifact_to_arrays
from fedge.runtime.store import current
from server.deploy import build
from server.federation import Evaluator
from tests.conftest import tiny_scenario_overrides


def _deploy_msg(artifact_dir):
    return Message(RecordDict({P.ARTIFACT: deltas.to_record(artifact_to_arrays(artifact_dir))}),
                   dst_node_id=3, message_type=P.DEPLOY_TYPE)


def test_deploy_installs_then_refuses_tampered_and_older(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    # Prepare: a signed artifact of a (fresh) adapter, and a device with a state directory
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [f"export.private_key={tmp_path / 'k' / 'fedge.key'}"])
    path = tmp_path / "scenario.yaml"
    path.write_text(fcfg.dump_yaml(cfg))
    run = tmp_path / "run"
    Evaluator(cfg).model.save_pretrained(run / "adapter")
    v1 = build(cfg, run, privacy={}, metrics={"central_loss": 1.0})
    v2 = build(cfg, run, privacy={}, metrics={"central_loss": 0.9})
    app = clients.app.make_app(str(path))
    ctx = Context(run_id=1, node_id=3, node_config={P.NODE_PARTITION_ID: 0, P.NODE_STATE_DIR: str(tmp_path / "dev"),
                                                    P.NODE_TRUSTED_KEY: str(tmp_path / "k" / "fedge.pub")},
                  state=RecordDict(), run_config={})
    store = tmp_path / "dev" / "partition-000000" / "models"

    def send(d):
        return dict(app(_deploy_msg(d), ctx).content[P.DEPLOY_RESULT])

    # Execute / Assert: v1 installs
    assert send(v1) == {P.DEPLOY_VERSION: 1}
    # a flipped byte in the payload of v2 is refused; v1 stays current
    bad = tmp_path / "bad"
    shutil.copytree(v2, bad)
    f = bad / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    r = send(bad)
    assert r[P.DEPLOY_REFUSED] and "sha256" in r[P.DEPLOY_MESSAGE].lower() and r[P.DEPLOY_VERSION] == 1
    assert current(store) == 1
    # the genuine v2 installs; then v1 again is an older version: refused, v2 kept
    assert send(v2) == {P.DEPLOY_VERSION: 2}
    r = send(v1)
    assert "version" in r[P.DEPLOY_MESSAGE] and current(store) == 2
    assert json.loads((v2 / "manifest.json").read_text())["version"] == 2


def _attacker_run(tmp_path, tiny_llama_dir):
    """A run submitted by someone who is not the operator: its config names the submitter's own signing key,
    and the artifact it pushes is signed with it."""
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir)
                    + [f"export.private_key={tmp_path / 'attacker' / 'fedge.key'}"])
    path = tmp_path / "scenario.yaml"
    path.write_text(fcfg.dump_yaml(cfg))
    run = tmp_path / "run"
    Evaluator(cfg).model.save_pretrained(run / "adapter")
    return path, build(cfg, run, privacy={}, metrics={"central_loss": 0.1})


def test_a_device_that_pinned_no_key_refuses_what_the_run_config_signs(tmp_path, tiny_llama_dir, flower_identity,
                                                                        torch_one_thread):
    # Prepare: a device enrolled without a trusted key; the run config points at the attacker's key
    scenario, artifact = _attacker_run(tmp_path, tiny_llama_dir)
    app = clients.app.make_app(str(scenario))
    ctx = Context(run_id=1, node_id=3, node_config={P.NODE_DEVICE_ID: "shop-1", P.NODE_STATE_DIR: str(tmp_path / "dev")},
                  state=RecordDict(), run_config={})
    # Execute
    r = dict(app(_deploy_msg(artifact), ctx).content[P.DEPLOY_RESULT])
    # Assert: refused, nothing installed
    assert r[P.DEPLOY_REFUSED] == "no-trusted-key" and r[P.DEPLOY_VERSION] == 0
    assert current(tmp_path / "dev" / "shop-1" / "models") is None


def test_the_pinned_key_wins_over_the_run_config(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    from fedge.export import generate_keypair

    # Prepare: the device pinned the operator's key at enrolment (a file in its state root)
    scenario, artifact = _attacker_run(tmp_path, tiny_llama_dir)
    operator = generate_keypair(tmp_path / "operator")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "trusted-key.pub").write_bytes(operator.public_pem.read_bytes())
    app = clients.app.make_app(str(scenario))
    ctx = Context(run_id=1, node_id=3, node_config={P.NODE_DEVICE_ID: "shop-1", P.NODE_STATE_DIR: str(tmp_path / "dev")},
                  state=RecordDict(), run_config={})
    # Execute
    r = dict(app(_deploy_msg(artifact), ctx).content[P.DEPLOY_RESULT])
    # Assert: checked against the pinned key, so the attacker's signature is refused
    assert r[P.DEPLOY_REFUSED] == "signature" and "another key" in r[P.DEPLOY_MESSAGE]
    assert current(tmp_path / "dev" / "shop-1" / "models") is None
