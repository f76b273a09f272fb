"""The devices' door to the SuperLink: forwards the Fleet API and nothing else.

Flower 1.42's SuperLink serves the Fleet API (``/v1/fleet/...``, SuperNodes), the Control
API (``/v1/control/...``: ``flwr run``, ``flwr supernode register``) and the Runtime API on
one HTTP port, and its open-source Control authentication accepts every caller. So
``fedge server`` binds the SuperLink to loopback and puts this proxy on the public address:

    device --TLS--> proxy (host:port) --TLS, loopback--> SuperLink (127.0.0.1:control port)

Only ``POST`` to one of the exact Fleet paths (read from Flower's own Fleet router, so a
new Fleet endpoint needs no change here) is forwarded; every other path, method or a path
with a query string gets 404 without reaching the SuperLink. Exact matching, not a prefix:
``/v1/fleet/../control/start-run`` or ``%2e%2e`` tricks are simply not in the set.
SuperNode authentication still happens in the SuperLink (the signed identity headers are
forwarded unchanged).

Why a fedge-owned proxy and not nginx: it needs no system package, starts and stops with
``fedge server`` like the other processes, and its allow-list cannot drift from Flower's
routes. It is Starlette + httpx + uvicorn, already pulled in by Flower.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
from pathlib import Path

log = logging.getLogger("fedge.fleet_proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself.
_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                   "transfer-encoding", "upgrade", "host", "content-length"})
MAX_BODY_BYTES = 2**31 - 1  # Flower's own message-size ceiling (GRPC_MAX_MESSAGE_LENGTH)


def fleet_paths() -> frozenset[str]:
    """The Fleet API's POST paths, from the router the SuperLink itself mounts."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(r.path for r in router.routes if "POST" in getattr(r, "methods", ()))
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise RuntimeError(f"unexpected Flower Fleet routes: {sorted(paths)}")
    return paths


def make_app(upstream: str, *, ca_cert: str | Path | None = None):
    """A Starlette app forwarding the Fleet paths to ``upstream`` (``https://127.0.0.1:PORT`` or ``http://``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    allowed = fleet_paths()
    verify: ssl.SSLContext | bool = False
    if upstream.startswith("https://"):
        if ca_cert is None:
            raise ValueError("ca_cert: required for an https upstream")
        # The loopback hop: the SuperLink's certificate must chain to our CA; its name is the
        # public one (the operator's certificate need not list 127.0.0.1 for this hop).
        verify = ssl.create_default_context(cafile=str(ca_cert))
        verify.check_hostname = False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(600.0, connect=10.0))

    async def forward(request: Request) -> Response:
        path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        if request.method != "POST" or path not in allowed or request.scope.get("query_string"):
            return JSONResponse({"error": "not served on this address (the Fleet API only)"}, status_code=404)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": "request body too large"}, status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        try:
            up = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError as err:
            log.warning("upstream %s failed: %s", path, type(err).__name__)
            return JSONResponse({"error": "SuperLink unreachable"}, status_code=502)
        out = {k: v for k, v in up.headers.items() if k.lower() not in _DROP | {"content-encoding"}}
        return Response(up.content, status_code=up.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    from starlette.routing import Route

    # One catch-all route: the allow-list decision is made in ``forward`` on the raw path.
    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                     lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedge.fleet_proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True, help="public address devices connect to")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the loopback SuperLink, e.g. https://127.0.0.1:9092")
    ap.add_argument("--ca-cert", help="CA that signed the SuperLink's certificate (https upstream)")
    ap.add_argument("--certfile", help="this address's TLS certificate (the SuperLink's)")
    ap.add_argument("--keyfile", help="its private key")
    a = ap.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-proxy %(levelname)s %(message)s")
    app = make_app(a.upstream, ca_cert=a.ca_cert)
    log.info("forwarding %d Fleet paths on %s:%d to %s", len(fleet_paths()), a.host, a.port, a.upstream)
    uvicorn.run(app, host=a.host, port=a.port, ssl_certfile=a.certfile, ssl_keyfile=a.keyfile,
                log_level="warning", access_log=False, workers=1)


if __name__ == "__main__":
    main()
