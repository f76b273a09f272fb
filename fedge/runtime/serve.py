"""Local HTTP serving of an installed model (stdlib ``http.server``; loopback by default).

Endpoints (JSON in, JSON out; errors as ``{"error": {"message", "type"}}``):

``POST /v1/chat/completions`` (causal LMs), OpenAI-compatible subset::

    request  {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "model": "..."}
             (greedy decoding: temperature/top_p are accepted and ignored; "stream": true → 400)
    response {"id": "chatcmpl-…", "object": "chat.completion", "created": unix, "model": name,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "…"},
                           "finish_reason": "stop" | "length"}],
              "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

``POST /v1/classify`` (classifiers)::

    request  {"text": "..."}  or  {"input": ["...", "..."]}
    response {"object": "classification", "model": name,
              "data": [{"index": i, "label": int, "label_name": str, "probs": [float, ...]}]}

``GET /v1/models`` and ``GET /health``.

There is no authentication: bind to 127.0.0.1 (the default) unless the network
in front of it is trusted. One request runs the model at a time (a lock).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedge.runtime.infer import LocalModel, load_installed

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB
MAX_TOKENS_LIMIT = 2048


class _BadRequest(ValueError):
    pass


def _make_handler(model: LocalModel, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedge"

        def log_message(self, fmt, *args):  # route to logging instead of stderr
            log.info("%s - %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind}})

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY:
                raise _BadRequest(f"request body must be 1 byte to {MAX_BODY} bytes of JSON")
            try:
                body = json.loads(self.rfile.read(n))
            except ValueError:
                raise _BadRequest("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise _BadRequest("request body must be a JSON object")
            return body

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, {"status": "ok", "version": model.version, "task": model.task})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                             "owned_by": "fedge", "task": model.task}]})
            else:
                self._error(404, f"no route GET {self.path}", "not_found")

        def do_POST(self):  # noqa: N802
            routes = {"/v1/chat/completions": ("causal-lm", self._chat), "/v1/classify":
                      ("sequence-classification", self._classify)}
            if self.path not in routes:
                return self._error(404, f"no route POST {self.path}", "not_found")
            task, handler = routes[self.path]
            if model.task != task:
                return self._error(400, f"{self.path} needs a {task} model; this server runs a {model.task} model")
            try:
                body = self._body()
                with lock:
                    result = handler(body)
            except _BadRequest as err:
                return self._error(400, str(err))
            except Exception as err:  # the server stays up; the client gets the reason
                log.exception("inference failed")
                return self._error(500, f"{type(err).__name__}: {err}", "server_error")
            self._send(200, result)

        def _chat(self, body: dict) -> dict:
            messages = body.get("messages")
            if (not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                    ("system", "user", "assistant") for m in messages)):
                raise _BadRequest("'messages' must be a non-empty list of {role: system|user|assistant, "
                                  "content: string}")
            if body.get("stream"):
                raise _BadRequest("streaming is not supported; send stream=false")
            max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
            if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
                raise _BadRequest(f"'max_tokens' must be an integer in [1, {MAX_TOKENS_LIMIT}]")
            r = model.chat([{"role": m["role"], "content": m["content"]} for m in messages],
                           max_new_tokens=max_tokens)
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}],
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                          "total_tokens": r.prompt_tokens + r.completion_tokens},
            }

        def _classify(self, body: dict) -> dict:
            texts = body.get("input", body.get("text"))
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise _BadRequest("send 'text' (a string) or 'input' (a non-empty list of strings)")
            results = model.classify(texts)
            return {"object": "classification", "model": model.name,
                    "data": [{"index": i, **r} for i, r in enumerate(results)]}

    return Handler


def make_server(model: LocalModel, *, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``model`` (not started: call ``serve_forever`` or :func:`start_in_thread`).

    ``port=0`` picks a free port: read it back from ``server.server_address[1]``.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: this endpoint has no authentication", host)
    server = ThreadingHTTPServer((host, port), _make_handler(model, threading.Lock()))
    server.daemon_threads = True
    return server


def start_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread; stop it with ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, name="fedge-serve", daemon=True)
    thread.start()
    return thread


def serve(store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **load_kwargs) -> None:
    """Load the store's current model and serve it until interrupted (blocking)."""
    model = load_installed(store_dir, **load_kwargs)
    server = make_server(model, host=host, port=port)
    log.info("serving %s (%s, %s backend%s) on http://%s:%d", model.name, model.task, model.backend,
             f", {model.compute} compute" if model.compute else "", *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
