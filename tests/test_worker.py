"""The device's warm worker: messages forwarded over its socket get the same replies, and
the node's Context state (secrets, accountant history) comes back with them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import clients.app
from clients.worker import WorkerError
from fedge import protocol as P


@pytest.fixture()
def worker(tmp_path):
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "clients.worker", "--socket", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield sock
    proc.kill()
    proc.wait()


def _ctx(sock=None, **node) -> Context:
    nc = {P.NODE_DEVICE_ID: "shop-1", **node}
    if sock is not None:
        nc[P.NODE_WORKER_SOCKET] = str(sock)
    return Context(run_id=1, node_id=5, node_config=nc, state=RecordDict(), run_config={})


def test_forwarded_messages_get_the_same_replies_and_bring_back_the_state(worker, flower_identity, tmp_path):
    # Prepare: the same app with and without a worker socket in the node config
    app = clients.app.make_app()
    ident = Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    setup = Message(RecordDict({P.SECAGG: ConfigRecord({P.SA_ROUND_ID: b"r" * 16, P.SA_INDEX: 2})}),
                    dst_node_id=5, message_type=P.SA_SETUP_TYPE)
    ctx = _ctx(worker, **{P.NODE_STATE_DIR: str(tmp_path / "st")})
    # Execute
    via_worker = app(ident, ctx)
    local = app(ident, _ctx(**{P.NODE_STATE_DIR: str(tmp_path / "st")}))
    keys = app(setup, ctx)
    # Assert: identical identity replies; the secrets the worker stored are in this Context now
    assert dict(via_worker.content[P.IDENTITY]) == dict(local.content[P.IDENTITY]) == {
        P.ID_CLIENT: "shop-1", P.ID_INSTALLED: 0}
    assert via_worker.metadata.reply_to_message_id == ident.metadata.message_id
    assert len(keys.content[P.SECAGG][P.SA_C_PK]) == 32
    assert int(ctx.state["secagg-state"][P.SA_INDEX]) == 2 and len(bytes(ctx.state["secagg-state"]["s-sk"])) == 32


def test_a_failing_handler_in_the_worker_fails_the_message(worker, flower_identity):
    app = clients.app.make_app()
    unmask = Message(RecordDict({P.SECAGG: ConfigRecord({P.SA_ROUND_ID: b"r" * 16, P.SA_SURVIVORS: [1],
                                                         P.SA_DROPPED: []})}),
                     dst_node_id=5, message_type=P.SA_UNMASK_TYPE)
    with pytest.raises(WorkerError, match="no key setup"):
        app(unmask, _ctx(worker))


def test_without_a_reachable_worker_the_app_handles_the_message_itself(tmp_path, flower_identity):
    app = clients.app.make_app()
    ident = Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    reply = app(ident, _ctx(tmp_path / "nobody-listens.sock"))
    assert reply.content[P.IDENTITY][P.ID_CLIENT] == "shop-1"
