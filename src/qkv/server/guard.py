"""The guard in front of every route: Host, API key and body size, checked before the app runs;
and every request counted by route.

- Host: a server that answers any Host header can be read by a web page through DNS rebinding
  (the page's own name made to point at 127.0.0.1); requests naming a host the server does not
  listen as get a 400 (Served.allowed_hosts; None accepts any, as on a wildcard address).
- API key: every route but GET /health needs 'Authorization: Bearer KEY' (the explorer page,
  which a browser opens without headers, also takes ?key=KEY).
- Body: at most MAX_BODY bytes, counted as they arrive whatever the framing (Content-Length or
  chunked); past it a 413 before the app reads any of it.
- Metrics: requests counted by route template ("/v1/completions"), any unknown path as
  "unmatched", so random paths cannot grow the series without bound.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from qkv.server.schemas import MAX_BODY, ApiError
from qkv.server.served import Served

OPEN = {("GET", "/health"), ("HEAD", "/health")}  # answered without the API key
UNMATCHED = "unmatched"  # the metrics label of every path no route serves
LEFT = "499"  # the metrics status of a request whose client left before its answer
# A Host header: a name or IPv4 address, or an IPv6 address in brackets, and an optional port.
HOST = re.compile(r"(?P<name>[a-z0-9.-]+|\[(?P<ipv6>[0-9a-f:.]+)\])(?::\d{1,5})?")


def host_name(header: str) -> str | None:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1", "a.b:80" -> "a.b";
    None for anything else (userinfo, paths, junk after the port)."""
    found = HOST.fullmatch(header.strip().lower())
    return None if found is None else found["ipv6"] or found["name"]


class Guard:
    """ASGI middleware around the app (see the module's docstring). Plain ASGI, so a streamed
    response's chunks go straight through."""

    def __init__(self, app: ASGIApp, served: Served, routes: Sequence[BaseRoute]) -> None:
        self.app, self.served, self.routes = app, served, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one: none gets past the guard
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = LEFT

        async def sending(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            refusal = self.refusal(Request(scope))
            if refusal is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                body = await self.read_body(receive)
                if body is None:  # the client left before sending it all
                    return
                if isinstance(body, JSONResponse):
                    refusal = body
                else:
                    receive = replay(body, receive)
            await (refusal or self.app)(scope, receive, sending)
        finally:
            self.served.metrics.requests.labels(self.label(scope), status).inc()

    def refusal(self, request: Request) -> JSONResponse | None:
        """A response refusing the request from its headers alone, or None."""
        allowed = self.served.allowed_hosts
        if allowed is not None and host_name(request.headers.get("host", "")) not in allowed:
            return ApiError(400, "this server does not answer to the host name "
                            f"{request.headers.get('host', '')!r}; start it with "
                            "--allowed-host NAME to serve it").response()  # fmt: skip
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return too_large()
        key = self.served.api_key
        path = request.scope["path"]  # what routing reads (request.url is built from Host)
        if key is not None and (request.method, path) not in OPEN:
            given = request.headers.get("authorization", "")
            if path == "/" and "key" in request.query_params:
                given = f"Bearer {request.query_params['key']}"
            if not secrets.compare_digest(given.encode("latin-1"), f"Bearer {key}".encode()):
                return ApiError(401, "a missing or wrong API key; send 'Authorization: Bearer "
                                "KEY'", kind="authentication_error").response()  # fmt: skip
        return None

    @staticmethod
    async def read_body(receive: Receive) -> bytes | JSONResponse | None:
        """The whole body, counted as it arrives: a 413 past MAX_BODY bytes, a 400 where it is
        not UTF-8, None where the client left."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > MAX_BODY:
                return too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return ApiError(400, f"the body is not UTF-8: byte 0x{body[err.start]:02x} at offset "
                            f"{err.start}; send JSON encoded as UTF-8").response()  # fmt: skip
        return body

    def label(self, scope: Scope) -> str:
        """The route template serving `scope`'s path (whatever its method), or UNMATCHED."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED


def too_large() -> JSONResponse:
    return ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB").response()


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app `body` in one message, then whatever the client sends next
    (its disconnect)."""
    sent = False

    async def again() -> AsgiMessage:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again
