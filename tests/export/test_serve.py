"""The loopback HTTP server: OpenAI-shaped chat completions and classification.

Integration: a real ThreadingHTTPServer on 127.0.0.1 port 0 in a thread, real HTTP
requests (urllib), stopped at the end. Oracle: the same LocalModel called directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from fedge.export.artifact import build_artifact
from fedge.runtime.infer import load_installed
from fedge.runtime.serve import make_server, start_in_thread
from fedge.runtime.store import install


@contextmanager
def running(model):
    server = make_server(model, host="127.0.0.1", port=0)
    thread = start_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def chat_model(llama_base_dir, llama_adapter_dir, keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    art = build_artifact(llama_adapter_dir, root / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, version=1)
    install(art, store_dir=root / "store", trusted_public_key=keys.public_pem)
    return load_installed(root / "store")


def test_chat_completion_in_openai_shape(chat_model):
    messages = [{"role": "user", "content": "hello world"}]
    with running(chat_model) as url:
        # Execute
        status, body = post(f"{url}/v1/chat/completions", {"model": "x", "messages": messages, "max_tokens": 6})
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
            models = json.loads(r.read())
    # Assert
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == chat_model.chat(messages, max_new_tokens=6).text
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert models["data"][0]["id"] == body["model"] == chat_model.name


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "streaming"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    (b"{not json", "not valid JSON"),
])
def test_bad_requests_get_openai_errors(chat_model, body, message):
    with running(chat_model) as url:
        status, reply = post(f"{url}/v1/chat/completions", body)
    assert status == 400 and message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_classify_route_needs_a_classifier(chat_model):
    with running(chat_model) as url:
        status, reply = post(f"{url}/v1/classify", {"text": "hi"})
        missing, _ = post(f"{url}/v1/nothing", {})
    assert status == 400 and "sequence-classification" in reply["error"]["message"]
    assert missing == 404


def test_classify(bert_base_dir, bert_adapter_dir, keys, tmp_path):
    # Prepare
    art = build_artifact(bert_adapter_dir, tmp_path / "art", base_source=str(bert_base_dir), private_key=keys.private,
                         task="sequence-classification", labels=["a", "b", "c"], version=1)
    install(art, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    model = load_installed(tmp_path / "store")
    # Execute
    with running(model) as url:
        status, body = post(f"{url}/v1/classify", {"input": ["hello world", "the lazy dog"]})
    # Assert
    assert status == 200 and body["object"] == "classification"
    assert [d["index"] for d in body["data"]] == [0, 1]
    direct = model.classify(["hello world", "the lazy dog"])
    assert [d["label"] for d in body["data"]] == [d["label"] for d in direct]
    assert body["data"][0]["probs"] == pytest.approx(direct[0]["probs"], abs=1e-6)
    assert sum(body["data"][0]["probs"]) == pytest.approx(1.0, abs=1e-4)
