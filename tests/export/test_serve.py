"""The local server: OpenAI-shaped chat completions and classification, and the doors it keeps shut.

Integration: the real server (Starlette on uvicorn) on 127.0.0.1, a free port, in a
thread, real HTTP over a socket (http.client, so the tests choose every header),
stopped at the end. Oracle: the same LocalModel called directly; for the attacks, the
status a browser or a slow client gets back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from fedge.export.artifact import build_artifact
from fedge.runtime.infer import load_installed
from fedge.runtime.serve import MAX_BODY, HTTPError, LocalServer, _Runner
from fedge.runtime.store import install


@contextmanager
def running(model, **kw):
    server = LocalServer(model, host="127.0.0.1", port=0, **kw).start()
    try:
        yield server
    finally:
        server.stop()
        assert not server.thread.is_alive()


def call(server, method: str, path: str, body=None, headers=None, timeout: float = 60) -> tuple[int, dict]:
    """One request; ``Host`` is ``127.0.0.1:<port>`` unless ``headers`` says otherwise."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Host": f"127.0.0.1:{server.port}"}
    if data is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in h.items():
            if v is not None:
                conn.putheader(k, v)
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:  # uvicorn's own plain-text refusals (a malformed request)
            return r.status, {"text": raw.decode(errors="replace")}
    finally:
        conn.close()


def post(server, path, body, headers=None):
    return call(server, "POST", path, body, headers)


@pytest.fixture(scope="module")
def chat_model(llama_base_dir, llama_adapter_dir, keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    art = build_artifact(llama_adapter_dir, root / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, version=1)
    install(art, store_dir=root / "store", trusted_public_key=keys.public_pem)
    return load_installed(root / "store")


HELLO = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}


def test_chat_completion_in_openai_shape(chat_model):
    messages = [{"role": "user", "content": "hello world"}]
    with running(chat_model) as srv:
        # Execute
        status, body = post(srv, "/v1/chat/completions", {"model": "x", "messages": messages, "max_tokens": 6})
        _, models = call(srv, "GET", "/v1/models")
        _, health = call(srv, "GET", "/health")
    # Assert
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == chat_model.chat(messages, max_new_tokens=6).text
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert usage["prompt_tokens"] == chat_model.prompt_tokens(messages)
    assert models["data"][0]["id"] == body["model"] == chat_model.name
    assert health == {"status": "ok", "version": 1, "task": "causal-lm"}


def sse_events(server, path: str, body: dict) -> tuple[int, str, list]:
    """POST with ``stream: true``; (status, content type, the ``data:`` payloads, JSON-decoded but [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}),
                     {"Host": f"127.0.0.1:{server.port}", "Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read().decode()
    finally:
        conn.close()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    return r.status, r.getheader("content-type"), [e if e == "[DONE]" else json.loads(e) for e in events]


def test_chat_and_completions_stream_as_server_sent_events(chat_model):
    # Prepare
    from fedge.runtime import stream

    chat = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10}
    completion = {"prompt": "the lazy", "max_tokens": 10}
    # Execute
    with running(chat_model) as srv:
        status, ctype, events = sse_events(srv, "/v1/chat/completions", chat)
        _, full = post(srv, "/v1/chat/completions", chat)
        c_status, _, c_events = sse_events(srv, "/v1/completions", completion)
        _, c_full = post(srv, "/v1/completions", completion)
    # Assert: role chunk, pieces, a finish chunk, [DONE]; pieces == the non-streamed answer == the model's
    assert status == 200 and ctype.startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"] == chat_model.chat(chat["messages"], max_new_tokens=10).text
    assert c_status == 200 and c_events[-1] == "[DONE]"
    c_text = "".join(c["choices"][0]["text"] for c in c_events[:-1])
    assert c_text == c_full["choices"][0]["text"] == stream.complete(chat_model, "the lazy", max_new_tokens=10).text


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "'stream' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    (b"{not json", "not valid JSON"),
])
def test_bad_requests_get_openai_errors(chat_model, body, message):
    with running(chat_model) as srv:
        status, reply = post(srv, "/v1/chat/completions", body)
    assert status == 400 and message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_classify_route_needs_a_classifier(chat_model):
    with running(chat_model) as srv:
        status, reply = post(srv, "/v1/classify", {"text": "hi"})
        missing, _ = post(srv, "/v1/nothing", {})
    assert status == 400 and "sequence-classification" in reply["error"]["message"]
    assert missing == 404


def test_classify(bert_base_dir, bert_adapter_dir, keys, tmp_path):
    # Prepare
    art = build_artifact(bert_adapter_dir, tmp_path / "art", base_source=str(bert_base_dir), private_key=keys.private,
                         task="sequence-classification", labels=["a", "b", "c"], version=1)
    install(art, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    model = load_installed(tmp_path / "store")
    # Execute
    with running(model) as srv:
        status, body = post(srv, "/v1/classify", {"input": ["hello world", "the lazy dog"]})
        too_long, reply = post(srv, "/v1/classify", {"text": "hello world " * 200})
    # Assert
    assert status == 200 and body["object"] == "classification"
    assert [d["index"] for d in body["data"]] == [0, 1]
    direct = model.classify(["hello world", "the lazy dog"])
    assert [d["label"] for d in body["data"]] == [d["label"] for d in direct]
    assert body["data"][0]["probs"] == pytest.approx(direct[0]["probs"], abs=1e-6)
    assert sum(body["data"][0]["probs"]) == pytest.approx(1.0, abs=1e-4)
    # the BERT's context is 64 positions: a longer text is refused, not silently cut
    assert too_long == 413 and "context is 64 tokens" in reply["error"]["message"]


# -- the doors -----------------------------------------------------------------------------------


def test_dns_rebinding_host_is_refused(chat_model):
    with running(chat_model) as srv:
        # Execute: what a page on evil.example sends once its name resolves to 127.0.0.1
        evil, reply = post(srv, "/v1/chat/completions", HELLO, {"Host": f"evil.example:{srv.port}"})
        wrong_port, _ = post(srv, "/v1/chat/completions", HELLO, {"Host": "127.0.0.1:1"})
        no_host, _ = call(srv, "GET", "/health", headers={"Host": None})
        by_name, _ = post(srv, "/v1/chat/completions", HELLO, {"Host": f"localhost:{srv.port}"})
        by_ip, _ = post(srv, "/v1/chat/completions", HELLO)
    # Assert
    assert evil == 421 and "DNS rebinding" in reply["error"]["message"]
    assert wrong_port == 421
    assert no_host == 400  # HTTP/1.1 without Host: refused by the parser before the app
    assert by_name == 200 and by_ip == 200


def test_cross_site_form_content_type_is_refused(chat_model):
    # What a page can POST without a CORS preflight: text/plain (the body is still JSON)
    with running(chat_model) as srv:
        plain, reply = post(srv, "/v1/chat/completions", HELLO, {"Content-Type": "text/plain"})
        form, _ = post(srv, "/v1/chat/completions", HELLO, {"Content-Type": "application/x-www-form-urlencoded"})
        charset, _ = post(srv, "/v1/chat/completions", HELLO, {"Content-Type": "application/json; charset=utf-8"})
    assert plain == 415 and form == 415 and "application/json" in reply["error"]["message"]
    assert charset == 200


def test_bearer_token(chat_model):
    with running(chat_model, token="s3cret-token") as srv:
        none, reply = post(srv, "/v1/chat/completions", HELLO)
        wrong, _ = post(srv, "/v1/chat/completions", HELLO, {"Authorization": "Bearer s3cret-tokeX"})
        health, _ = call(srv, "GET", "/health")
        right, _ = post(srv, "/v1/chat/completions", HELLO, {"Authorization": "Bearer s3cret-token"})
    assert none == 401 and wrong == 401 and health == 401 and reply["error"]["type"] == "authentication_error"
    assert right == 200


def test_prompt_past_the_context_is_413_and_the_answer_fits_it(chat_model):
    context = chat_model.context_length
    assert context == 256  # the tiny Llama's max_position_embeddings
    long = {"messages": [{"role": "user", "content": "hello world " * 300}], "max_tokens": 8}
    near = "hello " * 400
    # the largest prompt that still leaves 3 tokens of room (oracle: the model's own token count)
    words = max(k for k in range(1, 400) if chat_model.prompt_tokens([{"role": "user", "content": near[:6 * k]}])
                <= context - 3)
    fits = {"messages": [{"role": "user", "content": near[:6 * words]}], "max_tokens": 50}
    with running(chat_model) as srv:
        status, reply = post(srv, "/v1/chat/completions", long)
        ok, body = post(srv, "/v1/chat/completions", fits)
    assert status == 413 and f"context is {context} tokens" in reply["error"]["message"]
    assert ok == 200
    assert body["usage"]["total_tokens"] <= context
    assert body["usage"]["prompt_tokens"] == chat_model.prompt_tokens(fits["messages"])


def test_oversized_body_is_413(chat_model):
    with running(chat_model) as srv:
        status, reply = post(srv, "/v1/chat/completions", b"{" + b" " * MAX_BODY + b"}")
    assert status == 413


def test_500_carries_no_exception_text(chat_model, caplog):
    broken = dataclasses.replace(chat_model, model=None)  # its weights are gone: generate() fails inside
    with running(broken) as srv:
        status, reply = post(srv, "/v1/chat/completions", HELLO)
    assert status == 500 and reply["error"]["type"] == "server_error"
    text = reply["error"]["message"]
    assert text.startswith("internal error (request id ") and "NoneType" not in text and "Error" not in text
    rid = text.split("request id ")[1].rstrip(")")
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)  # the operator still sees why


def test_slow_client_is_disconnected(chat_model):
    # Slowloris: a request head that never completes must not hold a connection forever
    with running(chat_model, header_timeout=0.5, body_timeout=0.5) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and no more
        t0 = time.monotonic()
        closed = s.recv(1024) == b""  # blocks until the server closes (or the 5 s socket timeout)
        waited = time.monotonic() - t0
        s.close()
        # a complete head with a body that never arrives: 408
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: "
                  f"application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\"".encode())
        head = s.recv(1024)
        s.close()
    assert closed and waited < 3
    assert head.startswith(b"HTTP/1.1 408")


def test_worker_pool_is_bounded_and_times_out():
    # The pool the server runs the model in: 1 worker, 1 waiting, then 503; a slow answer is a 504
    release = threading.Event()

    async def scenario():
        runner = _Runner(workers=1, queue=1, timeout=5.0)
        first = asyncio.ensure_future(runner.run(release.wait))
        second = asyncio.ensure_future(runner.run(lambda: "second"))
        await asyncio.sleep(0.1)
        with pytest.raises(HTTPError) as busy:
            await runner.run(lambda: "third")
        release.set()
        done = await asyncio.gather(first, second)
        slow = _Runner(workers=1, queue=0, timeout=0.2)
        with pytest.raises(HTTPError) as late:
            await slow.run(time.sleep, 1.0)
        runner.close()
        slow.close()
        return busy.value, done, late.value

    busy, done, late = asyncio.run(scenario())
    assert busy.status == 503 and done == [True, "second"]
    assert late.status == 504


def test_cli_refuses_a_network_bind_without_a_token(tmp_path, capsys, monkeypatch):
    from fedge.cli import main

    monkeypatch.delenv("FEDGE_SERVE_TOKEN", raising=False)
    rc = main(["serve", "--store", str(tmp_path / "store"), "--host", "0.0.0.0", "--port", "0"])
    assert rc == 2 and "--token" in capsys.readouterr().err


def test_a_raising_on_text_stops_the_generation(chat_model):
    """What the server does when a stream's client leaves: its callback raises at the next piece."""
    from fedge.runtime import stream

    # Prepare
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt  # any exception; this one no handler in between would swallow

    pieces = []
    stream.chat(chat_model, [{"role": "user", "content": "hello world"}], max_new_tokens=40, on_text=pieces.append)
    # Execute / Assert: the exception leaves generate() at once; no third piece is decoded
    with pytest.raises(KeyboardInterrupt):
        stream.chat(chat_model, [{"role": "user", "content": "hello world"}], max_new_tokens=40, on_text=on_text)
    assert len(seen) == 2 and len(pieces) > 2


def test_a_client_leaving_mid_stream_stops_its_generation_and_frees_the_worker(chat_model):
    """End to end: the client closes its socket after the first piece; the server stops decoding
    long before the answer's end and its only worker takes the next request (one worker, no
    queue: a generation still running would answer that request 503)."""
    # Prepare: a device that takes 20 ms a token (a hook on the model's forward, which also counts them)
    forwards = []

    def slow(*_):
        forwards.append(time.monotonic())
        time.sleep(0.02)

    handle = chat_model.model.register_forward_hook(slow)
    chat = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 60, "stream": True}
    try:
        with running(chat_model, workers=1, queue=0) as srv:
            _, _, events = sse_events(srv, "/v1/chat/completions", chat)
            full = len(forwards)  # one forward a token: what a stream that is read to the end costs
            forwards.clear()
            # Execute: read up to the first piece, then leave
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            body = json.dumps(chat).encode()
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while received.count(b"data: ") < 2:  # the role chunk, then the first piece
                received += s.recv(4096)
            s.close()
            t_close = time.monotonic()
            time.sleep(1.0)  # 50 tokens' time: a generation left running would be past full // 2
            after = len(forwards)
            status, reply = post(srv, "/v1/chat/completions", {**chat, "stream": False, "max_tokens": 2})
    finally:
        handle.remove()
    # Assert: the full stream ran long enough to tell; decoding stopped within a few tokens of the close
    assert events[-1] == "[DONE]" and full >= 30
    # The generation checks its stop flag at each new piece of text, and this random tiny model's tokens
    # often decode to nothing, so it runs on for some tokens (15 when measured, at 20 ms each) but stops
    # long before the end, well before the 1 s sleep is over
    assert after < full // 2 and forwards[after - 1] - t_close < 0.8
    assert status == 200 and reply["choices"][0]["message"]["content"] is not None
