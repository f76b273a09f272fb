"""A warm ClientApp for a branch device: one long-lived process that handles every message.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for each message; ours then
imports torch/transformers, loads the base model and re-reads the local data (5-8 s on two
cores, several times per round). With a worker, that short-lived process only forwards the
message and the node's Context over a Unix socket to this process, which keeps the runtime
(model, tokenizer, tokenized data) between messages, runs the same ClientApp handlers, and
sends back the reply content and the updated Context state.

    flwr-clientapp process                      worker (python -m clients.worker)
    ----------------------                      ---------------------------------
    worker_mod(msg, context)  --- msg, ctx --->  app(msg, ctx)  (clients.app.make_app())
    reply with the content    <-- reply, ctx --  (runtime cache stays warm)

Frames: 8-byte little-endian length + Flower protobuf bytes (``flwr.common.serde``:
Message, Context). The socket is created with mode 0600 in the device's home directory.
The worker runs the fedge installed on the device (the same code the operator installed);
if it is unreachable, the ClientApp handles the message itself (slower, same result).
``fedge client`` starts it next to the SuperNode (``fedge._supernode --fedge-worker``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import threading
import time

from flwr.app import Context, Message

from fedge import flower_patches
from fedge import protocol as P

log = logging.getLogger("fedge.worker")

OK, FAILED = b"\x00", b"\x01"


class WorkerError(RuntimeError):
    """The worker ran the handler and it raised (the text is the worker-side error)."""


# -- framing -------------------------------------------------------------------------------

def _send(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(struct.pack("<Q", len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def _encode(msg: Message, context: Context) -> tuple[bytes, bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()


def _decode(msg_b: bytes, ctx_b: bytes) -> tuple[Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    return (message_from_proto(ProtoMessage.FromString(msg_b)),
            context_from_proto(ProtoContext.FromString(ctx_b)))


# -- the ClientApp side ----------------------------------------------------------------------

def worker_mod(msg: Message, context: Context, call_next) -> Message:
    """Client mod: hand the message to the device's warm worker when it has one (node config
    ``worker-socket``); otherwise (simulation, or the worker is down) run it here."""
    path = context.node_config.get(P.NODE_WORKER_SOCKET)
    if not path:
        return call_next(msg, context)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
    except OSError as err:
        log.warning("worker at %s unreachable (%s): handling the message in this process", path, err)
        return call_next(msg, context)
    with sock:
        _send(sock, *_encode(msg, context))
        status = _recv_exact(sock, 1)
        if status == FAILED:
            raise WorkerError(_recv(sock).decode(errors="replace"))
        reply, new_ctx = _decode(_recv(sock), _recv(sock))
    context.state = new_ctx.state  # DP accountant history, secure-aggregation secrets, ...
    if reply.has_error():
        raise WorkerError(reply.error.reason)
    return Message(reply.content, reply_to=msg)


# -- the worker ---------------------------------------------------------------------------------

def _handle(app, conn: socket.socket) -> None:
    from flwr.common.serde import context_to_proto, message_to_proto

    msg, ctx = _decode(_recv(conn), _recv(conn))
    ctx.node_config.pop(P.NODE_WORKER_SOCKET, None)  # handle it here, do not forward it again
    # Messages are created inside a task: this worker plays the task of the forwarding process.
    flower_patches.play_task(msg.metadata.run_id, ctx.node_id)
    try:
        reply = app(msg, ctx)
    except Exception as err:  # noqa: BLE001 - reported to the ClientApp, which turns it into an error reply
        log.warning("handler failed: %s: %s", type(err).__name__, err)
        conn.sendall(FAILED)
        _send(conn, f"{type(err).__name__}: {err}".encode())
        return
    conn.sendall(OK)
    _send(conn, message_to_proto(reply).SerializeToString(), context_to_proto(ctx).SerializeToString())


def serve(path: str, *, parent_pid: int | None = None) -> None:
    """Serve ClientApp messages on the Unix socket ``path`` until the parent process exits."""
    if not flower_patches.install_task_identity():
        # Without a task identity replies cannot be built here; with no socket, each ClientApp
        # process handles its message itself (worker_mod's fallback: slower, same replies).
        return
    import clients.app

    app = clients.app.make_app()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: only this user may talk to it
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(8)
    if parent_pid:
        def watch() -> None:
            while True:
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    os._exit(0)
                time.sleep(1.0)

        threading.Thread(target=watch, daemon=True).start()
    log.info("fedge worker ready on %s", path)
    lock = threading.Lock()  # one message at a time: the runtime (model, optimizer) is not shared

    def one(conn: socket.socket) -> None:
        with conn, lock:
            try:
                _handle(app, conn)
            except (ConnectionError, OSError) as err:
                log.warning("connection dropped: %s", err)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent-pid", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedge-worker %(levelname)s %(message)s",
                        stream=sys.stderr)
    serve(args.socket, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
