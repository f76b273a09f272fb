"""The ClientApp's train reply: only adapter tensors cross the wire, base hash enforced."""

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message, MessageType, RecordDict

import clients.app
import clients.cache
from fedge import config as fcfg
from fedge import deltas, models
from fedge import protocol as P
from server.federation import Evaluator, round_config
from strategies import scaffold
from tests.conftest import tiny_scenario_overrides


def _scenario_file(tmp_path, model_dir, *extra):
    cfg = fcfg.load("default", tiny_scenario_overrides(model_dir) + list(extra))
    path = tmp_path / f"scenario-{cfg.digest()[:6]}.yaml"
    path.write_text(fcfg.dump_yaml(cfg))
    return cfg, path


def _train_message(cfg, ev):
    content = RecordDict({P.ARRAYS: deltas.to_record(ev.initial_adapter()),
                          P.CONFIG: round_config(cfg, base_hash=ev.base.hash)})
    content[P.CONFIG][P.CFG_ROUND] = 1
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(pid=0):
    return Context(run_id=1, node_id=7, node_config={P.NODE_PARTITION_ID: pid, P.NODE_NUM_PARTITIONS: 3},
                   state=RecordDict(), run_config={})


def test_reply_holds_only_the_adapter_delta(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    # Prepare: the server's view (initial adapter, round config) and a client app on partition 0
    cfg, path = _scenario_file(tmp_path, tiny_llama_dir)
    ev = Evaluator(cfg)
    msg = _train_message(cfg, ev)
    app = clients.app.make_app(str(path))
    # Execute
    reply = app(msg, _context(0))
    # Assert: exactly the adapter's tensor names, shapes and fp32 bytes; nothing else
    adapter = ev.initial_adapter()
    wire = reply.content[P.ARRAYS]
    assert set(reply.content.array_records) == {P.ARRAYS}
    assert set(wire) == set(adapter) and all("lora_" in k for k in wire)
    base_names = set(ev.base.model.state_dict())
    assert not any(k.replace("base_model.model.", "") in base_names for k in wire)
    assert reply.content[P.METRICS][P.M_BYTES_UP] == deltas.record_bytes(wire)
    assert deltas.payload_bytes(deltas.from_record(wire)) == deltas.payload_bytes(adapter)
    # Metadata is the base hash and encoding only; metrics are numbers only
    assert dict(reply.content[P.META]) == {P.META_BASE_HASH: ev.base.hash, P.META_ENCODING: "fp32"}
    assert all(isinstance(v, (int, float)) for v in reply.content[P.METRICS].values())
    # No training text anywhere in the serialized payload
    rt = clients.cache.get_runtime(fcfg.load(path))
    train_ds = clients.cache.federated_split(**rt.data_args).clients[0][0]
    blob = b"".join(a.data for a in wire.values())
    assert not any(p.encode() in blob for p in train_ds["prompt"][:20] if len(p) > 8)
    # And the delta is exact protocol: A_t + Δ == the client's local adapter (fp32 wire rounding only)
    peft = next(iter(rt._peft.values()))
    local = models.get_adapter_state(peft)
    rebuilt = deltas.apply_delta(adapter, deltas.decode(deltas.from_record(wire), "fp32"))
    for k in local:
        np.testing.assert_allclose(rebuilt[k], local[k], rtol=1e-6, atol=1e-9)
    assert any(np.any(local[k] != adapter[k]) for k in local)  # it did train


def test_client_with_another_base_refuses(tmp_path, tiny_llama_dir, tiny_llama_other_dir, flower_identity, torch_one_thread):
    # Prepare: the server holds one base model, the client another (same shapes, other weights)
    server_cfg, _ = _scenario_file(tmp_path, tiny_llama_dir)
    ev = Evaluator(server_cfg)
    _, client_path = _scenario_file(tmp_path, tiny_llama_other_dir)
    app = clients.app.make_app(str(client_path))
    # Execute / Assert
    with pytest.raises(Exception, match="refusing to train on a different base model"):
        app(_train_message(server_cfg, ev), _context(0))


def test_evaluate_reports_local_heldout(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    cfg, path = _scenario_file(tmp_path, tiny_llama_dir)
    ev = Evaluator(cfg)
    msg = _train_message(cfg, ev)
    eval_msg = Message(msg.content, dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = clients.app.make_app(str(path))(eval_msg, _context(1))
    m = reply.content[P.METRICS]
    assert m[P.M_NUM_EXAMPLES] > 0 and np.isfinite(m[P.M_EVAL_LOSS]) and m[P.M_EVAL_LOSS] > 0


def test_a_node_without_partition_id_has_one_name_everywhere(tmp_path):
    # A node with neither device-id nor partition-id trains on partition 0: it is named after it,
    # and its state directory and its SCAFFOLD c_i file use that one name (the c_i file raised).
    assert P.client_name({}) == "partition-000000"
    assert P.client_name({P.NODE_PARTITION_ID: 3}) == "partition-000003"
    assert P.client_name({P.NODE_PARTITION_ID: 3, P.NODE_DEVICE_ID: "shop-1"}) == "shop-1"
    ctx = Context(run_id=1, node_id=7, node_config={P.NODE_STATE_DIR: str(tmp_path)}, state=RecordDict(), run_config={})
    assert clients.app._state_dir(ctx) == tmp_path / "partition-000000"
    assert scaffold._ci_file(ctx) == tmp_path / "partition-000000" / "scaffold-ci.npz"


def test_scenario_file_is_plain_yaml(tmp_path, tiny_llama_dir):
    _, path = _scenario_file(tmp_path, tiny_llama_dir)
    assert yaml.safe_load(path.read_text())["model"]["source"] == str(tiny_llama_dir)


def test_base_hash_is_cached_per_weight_files_and_follows_a_changed_model(tmp_path, monkeypatch):
    # Prepare: a model directory and an empty fedge cache
    from fedge import models
    from tests.conftest import make_tiny_llama

    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "cache"))
    d = make_tiny_llama(tmp_path / "m", seed=3)
    # Execute: load twice, then replace the weights by another model's
    first = models.load_base(str(d))
    again = models.load_base(str(d))
    make_tiny_llama(tmp_path / "m", seed=4)
    changed = models.load_base(str(d))
    # Assert: the cached value is the real hash, and new weight files are hashed afresh
    assert first.hash == again.hash == models.base_hash(again.model)
    assert len(list((tmp_path / "cache" / "base-hashes").iterdir())) == 2
    assert changed.hash == models.base_hash(changed.model) != first.hash


def test_device_node_config_sets_its_own_local_steps_and_batch_size(tmp_path, tiny_llama_dir, flower_identity,
                                                                     torch_one_thread):
    # Prepare: the server asks for 2 local steps; one device can afford only 1, with batch size 1
    cfg, path = _scenario_file(tmp_path, tiny_llama_dir)
    ev = Evaluator(cfg)
    app = clients.app.make_app(str(path))
    weak = Context(run_id=1, node_id=7, node_config={P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 3,
                                                     P.NODE_LOCAL_STEPS: 1, P.NODE_BATCH_SIZE: 1},
                   state=RecordDict(), run_config={})
    # Execute
    full = app(_train_message(cfg, ev), _context(0))
    light = app(_train_message(cfg, ev), weak)
    # Assert: each reply says how many steps it took; the lighter round moved the adapter less
    assert full.content[P.METRICS][P.M_LOCAL_STEPS] == cfg.train.local_steps == 2
    assert light.content[P.METRICS][P.M_LOCAL_STEPS] == 1
    norm = lambda r: deltas.l2_norm(deltas.decode(deltas.from_record(r.content[P.ARRAYS]), "fp32"))  # noqa: E731
    assert 0 < norm(light) < norm(full)
    bad = Context(run_id=1, node_id=7, node_config={P.NODE_PARTITION_ID: 0, P.NODE_LOCAL_STEPS: 0},
                  state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="local-steps must be a positive integer"):
        app(_train_message(cfg, ev), bad)
