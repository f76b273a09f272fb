"""What real clients get from ``fedge serve``: the official ``openai`` client, streaming and not.

Integration: the real ``fedge serve`` command (a subprocess, uvicorn on 127.0.0.1, a free
port it reports once bound), the official ``openai`` Python client and raw ``httpx``
server-sent events as a second client; the process is stopped by its PID. Oracles: the
same installed model called in the test (greedy decoding: the streamed pieces must
concatenate to exactly the non-streamed answer, which must equal the direct call).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedge.export.artifact import build_artifact
from fedge.runtime import stream
from fedge.runtime.infer import load_installed
from fedge.runtime.store import install

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

FEDGE = str(Path(sys.executable).parent / "fedge")
READY = re.compile(r"serving (\S+) \(version (\d+), (\S+) backend\) from .* on (http://\S+) ")
CHAT = [{"role": "user", "content": "hello world, how are you?"}]


@contextmanager
def fedge_serve(store: Path, *args: str, timeout: float = 120):
    """``fedge serve --port 0`` on ``store``; yields (url, first stdout line, process); stops it by PID."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDGE_SERVE_TOKEN", None)
    proc = subprocess.Popen([FEDGE, "serve", "--store", str(store), "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed only once the port is bound and the model loaded
        match = READY.search(line)
        if not match:
            proc.kill()
            raise AssertionError(f"fedge serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield match.group(4), line, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def store(llama_base_dir, llama_adapter_dir, keys, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-openai")
    art = build_artifact(llama_adapter_dir, root / "art", base_source=str(llama_base_dir), private_key=keys.private,
                         version=1)
    install(art, store_dir=root / "store", trusted_public_key=keys.public_pem)
    return root / "store"


@pytest.fixture(scope="module")
def served(store):  # a real process that imports torch and loads the model: 10-20 s on 2 busy cores
    with fedge_serve(store, "--backend", "torch") as (url, line, proc):
        yield url, line


@pytest.fixture(scope="module")
def oracle(store):
    return load_installed(store, backend="torch")


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.slow
def test_models_list_names_the_served_version(client, served, oracle):
    # Execute
    models = client.models.list()
    # Assert
    ids = [m.id for m in models.data]
    assert ids == [oracle.name] and ids[0].endswith("-v1")
    assert models.data[0].model_dump()["version"] == 1
    assert f"serving {oracle.name} (version 1, torch backend)" in served[1]


@pytest.mark.slow
def test_chat_stream_concatenates_to_the_non_streamed_answer(client, oracle):
    # Execute
    full = client.chat.completions.create(model=oracle.name, messages=CHAT, max_tokens=12)
    chunks = list(client.chat.completions.create(model=oracle.name, messages=CHAT, max_tokens=12, stream=True))
    # Assert: the non-streamed answer is the model's own greedy answer
    want = oracle.chat(CHAT, max_new_tokens=12)
    assert full.choices[0].message.content == want.text and full.choices[0].finish_reason == want.finish_reason
    # Assert: OpenAI's chunk format: role first, content pieces, one finish_reason at the end
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == oracle.name
               for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == want.text and sum(1 for p in pieces if p) >= 2  # streamed, not one blob
    assert [c.choices[0].finish_reason for c in chunks][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.slow
def test_completions_streamed_and_not(client, oracle):
    prompt = "the quick brown fox"
    # Execute
    full = client.completions.create(model=oracle.name, prompt=prompt, max_tokens=10)
    chunks = list(client.completions.create(model=oracle.name, prompt=prompt, max_tokens=10, stream=True))
    # Assert: the raw continuation (no chat template, not stripped) of the model itself
    want = stream.complete(oracle, prompt, max_new_tokens=10)
    assert full.object == "text_completion" and full.choices[0].text == want.text
    assert full.usage.prompt_tokens == stream.prompt_tokens(oracle, prompt)
    assert full.usage.completion_tokens == want.completion_tokens
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


@pytest.mark.slow
def test_refusals_before_the_stream_are_plain_errors(client, oracle):
    # Execute / Assert: a prompt past the context is refused before any event is sent
    with pytest.raises(openai.APIStatusError) as err:
        list(client.chat.completions.create(model=oracle.name, stream=True, max_tokens=4,
                                            messages=[{"role": "user", "content": "hello world " * 300}]))
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=oracle.name, prompt="hi", max_tokens=4, n=2)


@pytest.mark.slow
def test_second_client_raw_sse_with_usage(served, oracle):
    # Prepare: what a front end that speaks SSE itself sends (no SDK)
    body = {"model": oracle.name, "messages": CHAT, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    # Execute
    with httpx.Client(timeout=60) as http, http.stream("POST", served[0] + "/v1/chat/completions", json=body) as r:
        content_type = r.headers["content-type"]
        lines = [line for line in r.iter_lines() if line]
    # Assert: every line is one SSE data event; [DONE] last; a usage chunk with no choices before it
    assert r.status_code == 200 and content_type.startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == oracle.prompt_tokens(CHAT)
    want = oracle.chat(CHAT, max_new_tokens=12)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want.text
    assert usage["usage"]["completion_tokens"] == want.completion_tokens


def test_port_in_use_is_one_line_and_exit_2(tmp_path):
    # Prepare: the port is held by another socket
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        # Execute
        done = subprocess.run([FEDGE, "serve", "--store", str(tmp_path / "store"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    # Assert: exit 2, one plain line, no traceback, no "serving on"
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"fedge: port {port} on 127.0.0.1 is already in use (another "
                                                "fedge serve?); stop that server or choose another --port"]
    assert "serving" not in done.stdout


# -- llama.cpp --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_store(llama_base_dir, llama_adapter_dir, keys, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("serve-openai-gguf")
    art = build_artifact(llama_adapter_dir, root / "art", base_source=str(llama_base_dir), private_key=keys.private,
                         mode="merged", formats=("Q8_0",), version=1)
    install(art, store_dir=root / "store", trusted_public_key=keys.public_pem)
    return root / "store"


@pytest.mark.slow
def test_llama_cpp_streams_chat_and_completions(gguf_store):
    # Prepare
    oracle = load_installed(gguf_store, backend="llama.cpp", threads=1)
    with fedge_serve(gguf_store, "--backend", "llama.cpp") as (url, line, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # Execute
        full = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8)
        chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, stream=True))
        text = client.completions.create(model="m", prompt="the quick brown", max_tokens=8)
        text_chunks = list(client.completions.create(model="m", prompt="the quick brown", max_tokens=8, stream=True))
    # Assert: llama.cpp served it; streamed == non-streamed == the model called directly
    assert "llama.cpp backend" in line
    assert full.choices[0].message.content == oracle.chat(CHAT, max_new_tokens=8).text
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in text_chunks) == text.choices[0].text
    assert text.choices[0].text == stream.complete(oracle, "the quick brown", max_new_tokens=8).text
