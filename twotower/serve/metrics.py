"""Request metrics (Prometheus text format), body size limit and security headers.

One pure ASGI middleware does all three, so it sees every request, including the ones FastAPI
answers itself (404, 422) and the ones it refuses before the app runs (413).
"""

from __future__ import annotations

import threading
import time

from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class Metrics:
    """Request counters and latency histograms in the Prometheus text exposition format."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._hist: dict[tuple[str, str], list[float]] = {}  # bucket counts + [sum, count]

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        with self._lock:
            key = (route, method, str(status))
            self._counts[key] = self._counts.get(key, 0) + 1
            h = self._hist.setdefault((route, method), [0.0] * (len(self.BUCKETS) + 2))
            for i, le in enumerate(self.BUCKETS):
                if seconds <= le:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self, extra: dict[str, float] | None = None) -> str:
        """The exposition text (cumulative buckets, ``+Inf``, ``_sum``, ``_count``)."""
        out = [
            "# HELP twotower_http_requests_total HTTP requests by route template, method, status.",
            "# TYPE twotower_http_requests_total counter",
        ]
        with self._lock:
            counts = sorted(self._counts.items())
            hist = sorted((k, list(v)) for k, v in self._hist.items())
        for (route, method, status), n in counts:
            labels = _labels(route=route, method=method, status=status)
            out.append(f"twotower_http_requests_total{{{labels}}} {n}")
        out += [
            "# HELP twotower_http_request_duration_seconds Request latency by route template.",
            "# TYPE twotower_http_request_duration_seconds histogram",
        ]
        name = "twotower_http_request_duration_seconds"
        for (route, method), h in hist:
            base = _labels(route=route, method=method)
            for le, n in zip(self.BUCKETS, h, strict=False):
                out.append(f'{name}_bucket{{{base},le="{le:g}"}} {int(n)}')
            out.append(f'{name}_bucket{{{base},le="+Inf"}} {int(h[-1])}')
            out.append(f"{name}_sum{{{base}}} {h[-2]:.6f}")
            out.append(f"{name}_count{{{base}}} {int(h[-1])}")
        for key, value in (extra or {}).items():
            out += [f"# TYPE {key} gauge", f"{key} {value:g}"]
        return "\n".join(out) + "\n"


def _labels(**kv: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{k}="{esc(v)}"' for k, v in kv.items())


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "<unknown>")
    return "<unmatched>"


class _RouteCache:
    """Route template per (method, path), remembered for the most recent distinct paths.

    Matching walks every route with a regular expression; the hot paths (``/recommend``)
    repeat, so they are matched once.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._seen: dict[tuple[str, str], str] = {}

    def __call__(self, scope: Scope) -> str:
        key = (scope.get("method", ""), scope.get("path", ""))
        hit = self._seen.get(key)
        if hit is None:
            hit = _route_template(scope)
            if len(self._seen) >= self.size:
                self._seen.clear()
            self._seen[key] = hit
        return hit


class ServiceMiddleware:
    """Pure ASGI middleware: body size limit (413), security headers, metrics.

    The body is read up to ``max_body_bytes + 1`` bytes before the app sees it, so a chunked
    upload without ``Content-Length`` is bounded too.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._route = _RouteCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = self._route(scope)
        status = {"code": 500}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            too_big, receive2 = await self._buffer_body(scope, receive)
            if too_big:
                resp = JSONResponse(
                    {"detail": f"request body larger than {self.max_body_bytes} bytes"},
                    status_code=413,
                )
                await resp(scope, receive, send_wrapped)
            else:
                await self.app(scope, receive2, send_wrapped)
        finally:
            self.metrics.observe(
                route, scope.get("method", ""), status["code"], time.perf_counter() - start
            )

    async def _buffer_body(self, scope: Scope, receive: Receive) -> tuple[bool, Receive]:
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return False, receive
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return True, receive
                except ValueError:
                    return True, receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return False, _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return True, receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return False, _replay([body], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
