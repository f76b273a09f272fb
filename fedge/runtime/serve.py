"""Local HTTP serving of an installed model: a Starlette app on uvicorn (loopback by default).

Endpoints (JSON in, JSON out; errors as ``{"error": {"message", "type"}}``):

``POST /v1/chat/completions`` (causal LMs), OpenAI-compatible subset::

    request  {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "model": "...",
              "stream": false, "stream_options": {"include_usage": false}}
             (greedy decoding: temperature/top_p/stop are accepted and ignored)
    response {"id": "chatcmpl-…", "object": "chat.completion", "created": unix, "model": name,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "…"},
                           "finish_reason": "stop" | "length"}],
              "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

``POST /v1/completions`` (causal LMs, no chat template)::

    request  {"prompt": "..." | ["..."], "max_tokens": 16, "stream": false}
    response {"id": "cmpl-…", "object": "text_completion", "created", "model",
              "choices": [{"index": 0, "text": "…", "logprobs": null, "finish_reason": …}], "usage": {…}}

With ``"stream": true`` both answer ``text/event-stream`` (server-sent events, OpenAI's
chunk format) as the model generates: ``data: {chunk}`` lines — chat: ``object
"chat.completion.chunk"``, ``choices[0].delta`` = ``{"role": "assistant", "content": ""}``
first, then ``{"content": piece}``; completions: ``choices[0].text`` = piece — then one
chunk with an empty delta / text and the ``finish_reason``, a usage chunk (``choices: []``)
when ``stream_options.include_usage`` is true, and ``data: [DONE]``. The pieces
concatenate to the non-streamed answer. Refusals that can be known before the first
token (400, 413, 503, 504 waiting for a worker) are plain JSON errors with their status;
an error after the stream started ends it with ``data: {"error": {...}}`` and no
``[DONE]`` (a 500's request id, or the 504 deadline). A client that goes away stops the
generation at its next token.

``POST /v1/classify`` (classifiers)::

    request  {"text": "..."}  or  {"input": ["...", "..."]}
    response {"object": "classification", "model": name,
              "data": [{"index": i, "label": int, "label_name": str, "probs": [float, ...]}]}

``GET /v1/models`` and ``GET /health`` (both report the served ``version``). The served
model follows the store (``fedge.runtime.hotswap``): a newer install is loaded in the
background and switched to between requests.

Every request, before any route runs:

* ``Host`` must name this server (DNS rebinding: a page on ``evil.example`` that resolves
  its name to 127.0.0.1 sends ``Host: evil.example``): an IP literal or an allowed name
  (``localhost`` on a loopback bind, plus ``allowed_hosts``), with the bound port → else 421;
* with a token (``token=`` / ``fedge serve --token`` / ``FEDGE_SERVE_TOKEN``):
  ``Authorization: Bearer <token>``, compared in constant time → else 401;
* POST bodies: ``Content-Type: application/json`` (a browser sends no cross-site JSON
  without a CORS preflight, which this server never grants) → else 415; at most
  ``MAX_BODY`` bytes → else 413; read within ``body_timeout`` s → else 408.

Limits: request headers must arrive within ``header_timeout`` s of the connection (or
of the previous response), idle keep-alive connections close after 5 s, at most
``max_connections`` connections (uvicorn answers 503 past it); the model runs in a pool
of ``workers`` threads with at most ``queue`` requests waiting (503 past it) and each
answer within ``request_timeout`` s (504; the thread finishes its work and frees its
slot; a stream that passes it ends with a timeout error event and its generation stops). A chat prompt longer than the model's context is refused with 413; the answer
is cut to fit the context (``finish_reason: "length"``); a text to classify longer
than the context: 413. A 500 says "internal error" and a request id, never the
exception (it may hold paths or data); the log has the traceback under that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedge.runtime import stream
from fedge.runtime.hotswap import ModelSlot, StoreWatcher
from fedge.runtime.infer import LocalModel, load_installed

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB
MAX_TOKENS_LIMIT = 2048
MAX_INPUTS = 64  # texts per classify request
TOKEN_ENV = "FEDGE_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ServeError(RuntimeError):
    """``fedge serve`` cannot start (the port is taken, the address cannot be bound)."""


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    """``Host`` header → (host, port); IPv6 literals in brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = value, None
    try:
        return host, (int(port) if port else None)
    except ValueError:
        return host, -1


class _Guard:
    """ASGI middleware: Host, bearer token and content type, checked before the app sees a request."""

    def __init__(self, app, *, port: int, allowed_names: set[str], token: str | None):
        self.app, self.port, self.allowed_names, self.token = app, port, allowed_names, token

    def _host_ok(self, value: str | None) -> bool:
        if not value:
            return False
        host, port = _split_host(value)
        if (port or 80) != self.port:
            return False
        if host in self.allowed_names:
            return True
        try:
            ipaddress.ip_address(host)  # an IP literal cannot be a rebound name
            return True
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        response = None
        if not self._host_ok(headers.get("host")):
            response = _error(421, "this server does not answer for that Host (DNS rebinding protection); "
                                   "use the address it is bound to", "misdirected_request")
        elif self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                response = _error(401, "missing or wrong bearer token", "authentication_error",
                                  {"WWW-Authenticate": "Bearer"})
        if response is None and scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                response = _error(415, "Content-Type must be application/json")
        if response is not None:
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _Runner:
    """A bounded pool for the model: ``workers`` threads, ``queue`` waiting requests, a timeout each."""

    def __init__(self, workers: int, queue: int, timeout: float):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedge-infer")
        self.capacity, self.timeout = workers + queue, timeout
        self.pending = 0
        self.lock = threading.Lock()

    def start(self, fn, *args) -> Future:
        """Queue ``fn(*args)`` (503 when ``workers + queue`` requests are already in)."""
        with self.lock:
            if self.pending >= self.capacity:
                raise HTTPError(503, "server busy: too many requests waiting for the model", "server_busy",
                                {"Retry-After": "1"})
            self.pending += 1
        future = self.pool.submit(fn, *args)

        def release(_):
            with self.lock:
                self.pending -= 1

        future.add_done_callback(release)  # the slot frees when the work ends, not when the client gives up
        return future

    async def run(self, fn, *args):
        future = self.start(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the model did not answer within {self.timeout:g} s", "timeout") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _json_body(request: Request, timeout: float) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HTTPError(413, f"request body must be at most {MAX_BODY} bytes of JSON")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise HTTPError(413, f"request body must be at most {MAX_BODY} bytes of JSON")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout:g} s", "timeout") from None
    if size == 0:
        raise HTTPError(400, f"request body must be 1 byte to {MAX_BODY} bytes of JSON")
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise HTTPError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body


def _closing(runner: _Runner):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        runner.close()

    return lifespan


class _Cancelled(Exception):
    """Raised into the generation when its stream's client went away or its deadline passed."""


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _max_tokens(body: dict, default: int) -> int:
    n = body.get("max_tokens", body.get("max_completion_tokens", default))
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_TOKENS_LIMIT:
        raise HTTPError(400, f"'max_tokens' must be an integer in [1, {MAX_TOKENS_LIMIT}]")
    return n


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    streaming, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(streaming, bool):
        raise HTTPError(400, "'stream' must be true or false")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise HTTPError(400, "'stream_options' must be an object like {\"include_usage\": true}")
    return streaming, bool(options.get("include_usage")) and streaming


def make_app(model: LocalModel | ModelSlot, *, port: int, allowed_hosts=(), token: str | None = None,
             loopback: bool = True, workers: int = 1, queue: int = 8, request_timeout: float = 120.0,
             body_timeout: float = 10.0):
    """The ASGI app (guard + routes) for ``model`` (a slot: the model can be swapped while serving);
    ``port`` is the port clients put in ``Host``."""
    runner = _Runner(workers, queue, request_timeout)
    slot = model if isinstance(model, ModelSlot) else ModelSlot(model)

    def room(m: LocalModel, n: int, max_tokens: int) -> int:
        """Answer tokens that fit after an ``n``-token prompt (413 when none do)."""
        context = m.context_length
        if context is not None and n >= context:
            raise HTTPError(413, f"the prompt is {n} tokens; this model's context is {context} tokens",
                            "context_length_exceeded")
        return max_tokens if context is None else min(max_tokens, context - n)

    def chat(body: dict) -> dict:
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                ("system", "user", "assistant") for m in messages)):
            raise HTTPError(400, "'messages' must be a non-empty list of {role: system|user|assistant, "
                                 "content: string}")
        streaming, usage = _stream_flags(body)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return {"messages": messages, "max_tokens": _max_tokens(body, 64), "stream": streaming, "usage": usage}

    def completion(body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "'prompt' must be a non-empty string (or a list of one)")
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1 or body.get("echo") or body.get("suffix"):
            raise HTTPError(400, "n, best_of, echo and suffix are not supported (one greedy continuation)")
        streaming, usage = _stream_flags(body)
        return {"prompt": prompt, "max_tokens": _max_tokens(body, 16), "stream": streaming, "usage": usage}

    def run_chat(req: dict, on_start=None, on_text=None):
        with slot.use() as m:
            n = m.prompt_tokens(req["messages"])
            limit = room(m, n, req["max_tokens"])
            if on_start is not None:
                on_start(m.name)
            r = stream.chat(m, req["messages"], max_new_tokens=limit, on_text=on_text)
            return m.name, r

    def run_completion(req: dict, on_start=None, on_text=None):
        with slot.use() as m:
            if m.task != "causal-lm":
                raise HTTPError(400, f"/v1/completions needs a causal-lm model; this server runs a {m.task} model")
            limit = room(m, stream.prompt_tokens(m, req["prompt"]), req["max_tokens"])
            if on_start is not None:
                on_start(m.name)
            return m.name, stream.complete(m, req["prompt"], max_new_tokens=limit, on_text=on_text)

    def usage_of(r) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def chat_response(name: str, r) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                         "finish_reason": r.finish_reason}],
            "usage": usage_of(r),
        }

    def completion_response(name: str, r) -> dict:
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "text": r.text, "logprobs": None,
                                            "finish_reason": r.finish_reason}],
                "usage": usage_of(r)}

    def chat_chunks(cid: str, created: int, name: str):
        def chunk(delta=None, finish=None, usage=None):
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return body

        return (chunk({"role": "assistant", "content": ""}), lambda piece: chunk({"content": piece}),
                lambda finish: chunk({}, finish), lambda usage: chunk(usage=usage))

    def completion_chunks(cid: str, created: int, name: str):
        def chunk(text="", finish=None, usage=None):
            body = {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [] if usage else [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return body

        return None, lambda piece: chunk(piece), lambda finish: chunk("", finish), lambda usage: chunk(usage=usage)

    async def streamed(run: Callable, req: dict, kind: str):
        """Run ``run`` in the pool and answer its pieces as server-sent events (module docstring)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        deadline = loop.time() + request_timeout

        def put(*event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        def on_text(piece: str) -> None:
            if stop.is_set():
                raise _Cancelled
            put("text", piece)

        future = runner.start(run, req, lambda name: put("start", name), on_text)
        future.add_done_callback(lambda f: put("done", f))

        async def next_event():
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), left)

        try:
            first = await next_event()
        except asyncio.TimeoutError:
            stop.set()
            raise HTTPError(504, f"the model did not answer within {request_timeout:g} s", "timeout") from None
        if first[0] == "done":
            first[1].result()  # raises what the work raised: a 400/413 HTTPError, or a 500
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head, piece_chunk, final_chunk, usage_chunk = (chat_chunks if kind == "chat" else completion_chunks)(
            cid, int(time.time()), first[1])

        async def body():
            try:
                if head is not None:
                    yield _sse(head)
                while True:
                    try:
                        event = await next_event()
                    except asyncio.TimeoutError:
                        stop.set()
                        yield _sse({"error": {"message": f"the answer did not finish within {request_timeout:g} s",
                                              "type": "timeout"}})
                        return
                    if event[0] == "text":
                        yield _sse(piece_chunk(event[1]))
                    elif event[0] == "done":
                        try:
                            _, r = event[1].result()
                        except Exception as err:  # noqa: BLE001 - the stream has started: say so in it
                            rid = uuid.uuid4().hex[:12]
                            log.error("request %s failed", rid, exc_info=err)
                            yield _sse({"error": {"message": f"internal error (request id {rid})",
                                                  "type": "server_error"}})
                            return
                        yield _sse(final_chunk(r.finish_reason))
                        if req["usage"]:
                            yield _sse(usage_chunk(usage_of(r)))
                        yield _sse("[DONE]")
                        return
            finally:
                stop.set()  # a client that went away (the generator is closed) stops the generation

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    def classify(body: dict) -> list[str]:
        texts = body.get("input", body.get("text"))
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise HTTPError(400, "send 'text' (a string) or 'input' (a non-empty list of strings)")
        if len(texts) > MAX_INPUTS:
            raise HTTPError(413, f"at most {MAX_INPUTS} texts per request")
        return texts

    def run_classify(texts: list[str]) -> dict:
        with slot.use() as m:
            context = m.context_length
            if context is not None:
                lengths = m.text_tokens(texts)
                longest = max(range(len(texts)), key=lengths.__getitem__)
                if lengths[longest] > context:
                    raise HTTPError(413, f"input {longest} is {lengths[longest]} tokens; this model's context is "
                                         f"{context} tokens", "context_length_exceeded")
            return {"object": "classification", "model": m.name,
                    "data": [{"index": i, **r} for i, r in enumerate(m.classify(texts))]}

    # path → (task it needs, parse, run, kind); kind None: JSON only, else streamable "chat" / "completion"
    routes_for = {"/v1/chat/completions": ("causal-lm", chat, run_chat, "chat"),
                  "/v1/completions": ("causal-lm", completion, run_completion, "completion"),
                  "/v1/classify": ("sequence-classification", classify, run_classify, None)}

    async def post(request: Request):
        task, parse, run, kind = routes_for[request.url.path]
        if slot.model.task != task:
            raise HTTPError(400, f"{request.url.path} needs a {task} model; this server runs a "
                                 f"{slot.model.task} model")
        req = parse(await _json_body(request, body_timeout))
        if kind is None:
            return JSONResponse(await runner.run(run, req))
        if req["stream"]:
            return await streamed(run, req, kind)
        name, r = await runner.run(run, req)
        return JSONResponse(chat_response(name, r) if kind == "chat" else completion_response(name, r))

    async def health(request: Request):
        m = slot.model
        body = {"status": "ok", "version": m.version, "task": m.task}
        if m.fallback_from:
            body["fallback_from"] = m.fallback_from
        return JSONResponse(body)

    async def models(request: Request):
        m = slot.model
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "fedge",
                                                         "created": 0, "task": m.task, "version": m.version}]})

    async def http_error(request: Request, err: HTTPError):
        return _error(err.status, err.message, err.kind, err.headers)

    async def not_found(request: Request, exc):
        return _error(404, f"no route {request.method} {request.url.path}", "not_found")

    async def not_allowed(request: Request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")

    async def internal(request: Request, exc: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("request %s failed", rid, exc_info=exc)  # the traceback stays in the log
        return _error(500, f"internal error (request id {rid})", "server_error")

    app = Starlette(
        routes=[*(Route(path, post, methods=["POST"]) for path in routes_for),
                Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"])],
        exception_handlers={HTTPError: http_error, 404: not_found, 405: not_allowed, Exception: internal},
        lifespan=_closing(runner),
    )
    names = {h.lower() for h in allowed_hosts} | ({"localhost"} if loopback else set())
    return _Guard(app, port=port, allowed_names=names, token=token)


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol plus a header deadline: a connection that has not sent a complete
    request head ``header_timeout`` s after it opened (or after its last response) is closed
    (uvicorn has none: one byte every few seconds would hold a connection forever)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        armed_for = self.cycle

        def expire():
            if self.cycle is armed_for and not self.transport.is_closing():  # no new request head since
                self.transport.close()

        self.loop.call_later(self.header_timeout, expire)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; :class:`ServeError` with one plain sentence when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (another fedge serve?); "
                             "stop that server or choose another --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class LocalServer:
    """The model behind uvicorn on ``host:port`` (``port=0``: a free one, see ``.port``).

    ``model``: a :class:`LocalModel`, or a :class:`ModelSlot` whose model may be swapped
    while serving. ``sock``: an already bound socket (``bind``) instead of ``host:port``.
    ``start()`` runs it in a thread, ``stop()`` ends it; ``run()`` blocks (``fedge serve``).
    """

    def __init__(self, model: LocalModel | ModelSlot, *, host: str = "127.0.0.1", port: int = 8000,
                 token: str | None = None, allowed_hosts=(), workers: int = 1, queue: int = 8,
                 request_timeout: float = 120.0, body_timeout: float = 10.0, header_timeout: float = 10.0,
                 max_connections: int = 64, sock: socket.socket | None = None):
        self.sock = sock if sock is not None else bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.slot = model if isinstance(model, ModelSlot) else ModelSlot(model)
        model = self.slot
        if not is_loopback(host) and not token:
            log.warning("serving on %s without a token: anyone who can reach this port can use the model", host)
        app = make_app(model, port=self.port, allowed_hosts=allowed_hosts, token=token, loopback=is_loopback(host),
                       workers=workers, queue=queue, request_timeout=request_timeout, body_timeout=body_timeout)
        protocol = type("TimedH11", (_TimedH11,), {"header_timeout": header_timeout})
        config = uvicorn.Config(app, http=protocol, lifespan="on", log_config=None, access_log=False,
                                timeout_keep_alive=5, limit_concurrency=max_connections, server_header=False,
                                proxy_headers=False, h11_max_incomplete_event_size=16 * 1024)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> LocalServer:
        self.thread = threading.Thread(target=self.run, name="fedge-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          allowed_hosts=(), workers: int = 1, queue: int = 8, request_timeout: float = 120.0,
          watch_interval: float = 1.0, ready: Callable[[LocalServer], None] | None = None,
          **load_kwargs: Any) -> None:
    """Serve the store's current model (falling back to the previous version when it is refused)
    until interrupted (blocking); ``token`` defaults to ``$FEDGE_SERVE_TOKEN``.

    The port is bound first (:class:`ServeError` when it cannot be, before any model is
    loaded), then the model is loaded, then ``ready(server)`` is called. With
    ``watch_interval`` > 0 the store is polled that often and a newly installed version
    replaces the served one between requests (``fedge.runtime.hotswap``)."""
    sock = bind(host, port)
    try:
        model = load_installed(store_dir, **load_kwargs)
    except BaseException:
        sock.close()
        raise
    token = token or os.environ.get(TOKEN_ENV) or None
    slot = ModelSlot(model)
    server = LocalServer(slot, host=host, token=token, allowed_hosts=allowed_hosts, workers=workers,
                         queue=queue, request_timeout=request_timeout, sock=sock)
    log.info("serving %s (%s, %s backend%s) on %s%s", model.name, model.task, model.backend,
             f", {model.compute} compute" if model.compute else "", server.url, " (token required)" if token else "")
    watcher = StoreWatcher(slot, store_dir, interval=watch_interval, **load_kwargs) if watch_interval > 0 else None
    if ready is not None:
        ready(server)
    if watcher is not None:
        watcher.start()
    try:
        server.run()
    finally:
        if watcher is not None:
            watcher.stop()
