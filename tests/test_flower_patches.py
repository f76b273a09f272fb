"""Canaries for fedge's patches of Flower internals (fedge/flower_patches.py).

Each patch relies on private Flower code. The first test of each block fails the moment a
Flower upgrade changes what the patch reads; the others show that a mismatch leaves Flower's
own behaviour in place with a log line (or, for the app-bundle check, refuses clearly).
Fast: no Ray, no SuperLink, no model.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
import time
import types
from pathlib import Path

import pytest

from fedge import flower_patches as fp

ROOT = Path(__file__).resolve().parents[1]


def _load_copy(path: str | Path, name: str) -> types.ModuleType:
    """A private copy of a module from its file: patches applied to it leave the real one alone."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # inspect.getsource finds the file through the module
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def sci_copy(request):
    import flwr.supernode.start_client_internal as sci

    name = f"_fedge_sci_copy_{request.node.name}"
    yield _load_copy(sci.__file__, name)
    sys.modules.pop(name, None)


def test_flower_range_is_the_pinned_range():
    # Widening the pin in pyproject must come with re-checking every patch here.
    pin = re.search(r'"flwr\[[a-z,]+\]([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == fp.FLOWER_RANGE


@pytest.mark.parametrize("check", [fp.check_one_sweep_delivery, fp.check_supernode_idle_poll,
                                   fp.check_task_identity, fp.check_app_check])
def test_a_flower_outside_the_range_falls_back(check):
    verdict = check(version="1.43.0")
    assert verdict.action == "fallback" and "1.43.0" in verdict.reason


# -- one-sweep-delivery ----------------------------------------------------------------------------

def test_canary_one_sweep_delivery():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert list(inspect.signature(vce_api.add_messages_to_queue).parameters) == fp.DELIVERY_PARAMS
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    assert list(inspect.signature(InMemoryLinkState._check_stored_messages).parameters)[:2] == ["self", "message_ids"]
    init, get = inspect.getsource(InMemoryLinkState.__init__), inspect.getsource(InMemoryLinkState.get_message_ins)
    assert all(m in init for m in fp.LINKSTATE_INIT_MARKERS)
    assert all(m in get for m in fp.GET_MESSAGE_INS_MARKERS)
    assert fp.check_one_sweep_delivery().action == "apply"


def test_one_sweep_delivery_falls_back_on_a_changed_signature(caplog):
    from flwr.server.superlink.fleet.vce import vce_api

    def flower_fn(state, queue, nodes_mapping, f_stop, batch_size):  # a future Flower's signature
        pass

    fake = types.SimpleNamespace(add_messages_to_queue=flower_fn, run_api=vce_api.run_api)
    assert fp.check_one_sweep_delivery(fake).action == "fallback"
    with caplog.at_level(logging.WARNING, logger="fedge.flower_patches"):
        assert fp.install_one_sweep_delivery(fake) is False
    assert fake.add_messages_to_queue is flower_fn  # Flower's own function stays
    assert "not applying one-sweep-delivery" in caplog.text and "add_messages_to_queue takes" in caplog.text


def test_one_sweep_delivery_applies_once_and_keeps_flower_for_other_states():
    from flwr.server.superlink.fleet.vce import vce_api

    calls = []

    def flower_fn(state, queue, nodes_mapping, f_stop):
        calls.append(state)

    fake = types.SimpleNamespace(add_messages_to_queue=flower_fn, run_api=vce_api.run_api)
    assert fp.install_one_sweep_delivery(fake) and fp.install_one_sweep_delivery(fake)
    patched = fake.add_messages_to_queue
    assert patched is not flower_fn and patched.flower_fn is flower_fn  # installed once, not wrapped twice
    patched("a SQLite state", None, {}, None)
    assert calls == ["a SQLite state"]


# -- supernode-idle-poll -----------------------------------------------------------------------------

def test_canary_supernode_idle_poll():
    import ast

    import flwr.supernode.start_client_internal as sci

    assert sci.time is time or getattr(sci.time, "fedge_patch", None) == fp.IDLE_POLL
    assert fp._idle_sleeps(ast.parse(inspect.getsource(sci))) == (1, 1)  # the only 3 s sleep is the idle poll
    assert fp.check_supernode_idle_poll().action == "apply"


def test_idle_poll_falls_back_when_another_3s_sleep_appears(tmp_path, caplog):
    src = tmp_path / "future_sci.py"
    src.write_text("import time\n\n\ndef start_client_internal():\n    while True:\n        run_id = None\n"
                   "        if run_id is None:\n            time.sleep(3)\n            continue\n"
                   "        time.sleep(3)  # a second 3 s wait the shim would also shorten\n")
    fake = _load_copy(src, "_fedge_future_sci")
    try:
        assert fp.check_supernode_idle_poll(fake).action == "fallback"
        with caplog.at_level(logging.WARNING, logger="fedge.flower_patches"):
            assert fp.install_supernode_idle_poll(0.5, fake) is False
    finally:
        sys.modules.pop("_fedge_future_sci", None)
    assert fake.time is time  # Flower's 3 s poll stays
    assert "not applying supernode-idle-poll" in caplog.text and "2 time.sleep(3)" in caplog.text


def test_idle_poll_shortens_only_the_3s_sleep(sci_copy, monkeypatch):
    import flwr.supernode.start_client_internal as sci

    assert fp.install_supernode_idle_poll(0.25, sci_copy)
    assert sci.time is time  # the real module is untouched
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sci_copy.time.sleep(3)
    sci_copy.time.sleep(0.5)
    assert slept == [0.25, 0.5]


# -- task-identity -------------------------------------------------------------------------------------

def test_canary_task_identity():
    import flwr.app.message.message as message_module
    from flwr.supercore.task_identity import TaskIdentity

    for name in fp.IDENTITY_FIELDS:
        prop = getattr(type(TaskIdentity), name)
        assert isinstance(prop, property) and prop.fset is not None
    assert message_module.TaskIdentity is TaskIdentity  # new Messages read the identity we set
    assert fp.check_task_identity().action == "apply"


def test_task_identity_falls_back_without_setters(caplog):
    class FutureIdentity:  # plain class attributes: no setters Flower's runtime uses
        task_id = run_id = node_id = None

    assert fp.check_task_identity(FutureIdentity).action == "fallback"
    with caplog.at_level(logging.WARNING, logger="fedge.flower_patches"):
        assert fp.install_task_identity(FutureIdentity) is False
    assert "not applying task-identity" in caplog.text and "TaskIdentity.task_id" in caplog.text


def test_play_task_sets_the_identity():
    class Identity:
        pass

    fp.play_task(7, 9, cls=Identity)
    assert (Identity.task_id, Identity.run_id, Identity.node_id) == (1, 7, 9)


def test_worker_does_not_serve_when_the_identity_cannot_be_set(tmp_path, monkeypatch):
    import clients.worker

    monkeypatch.setattr(fp, "check_task_identity", lambda *a, **k: fp.Verdict(fp.TASK_IDENTITY, "fallback", "x"))
    sock = tmp_path / "w.sock"
    clients.worker.serve(str(sock))  # returns at once; worker_mod then handles messages in-process
    assert not sock.exists()


# -- app-check ------------------------------------------------------------------------------------------

@pytest.fixture()
def public_key(tmp_path):
    from fedge.export import generate_keypair

    generate_keypair(tmp_path, name="op")
    return str(tmp_path / "op.pub")


def test_canary_app_check():
    import flwr.supernode.start_client_internal as sci

    assert fp.PULL_PARAMS <= set(inspect.signature(sci._pull_and_store_message).parameters)
    assert list(inspect.signature(sci._verify_fab).parameters) == ["fab", "trusted_entities"]
    assert all(m in inspect.getsource(sci._pull_and_store_message) for m in fp.PULL_MARKERS)
    assert fp.PULL_PARAMS <= fp._pull_call_keywords(sci)
    assert fp.check_app_check().action == "apply"


def test_app_check_replaces_both_names(sci_copy, public_key):
    flower_pull, flower_verify = sci_copy._pull_and_store_message, sci_copy._verify_fab
    fp.install_app_check(sci_copy, public_key)
    assert sci_copy._pull_and_store_message is not flower_pull and sci_copy._verify_fab is not flower_verify


def test_app_check_refuses_to_start_on_a_changed_flower(sci_copy, public_key):
    def verify_fab(fab, trusted_entities, policy):  # a future Flower's signature
        return False

    sci_copy._verify_fab = verify_fab
    assert fp.check_app_check(sci_copy).action == "fallback"
    import flwr

    with pytest.raises(fp.FlowerContractError, match=rf"Flower {re.escape(flwr.__version__)}: .*_verify_fab takes"):
        fp.install_app_check(sci_copy, public_key)
    assert sci_copy._verify_fab is verify_fab
