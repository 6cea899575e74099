"""HTTP endpoints: /health, /ready, /metrics, served by hypercorn on trio.

Owns: routes, status codes and JSON shapes. Everything it reports comes from a
``HealthSource`` the daemon hands it; it never touches MongoDB or the engine itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route


class HealthSource(Protocol):
    def health(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def metrics_text(self) -> bytes: ...


def build_app(source: HealthSource) -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse(source.health())

    async def ready(request: Request) -> Response:
        ok, body = source.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(source.metrics_text(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


async def serve_http(
    source: HealthSource,
    port: int,
    *,
    host: str = "0.0.0.0",
    shutdown: Callable[[], Any] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (or ``shutdown`` returns). Reports the bound addresses."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None  # failures reach the daemon as exceptions, and it logs them
    config.graceful_timeout = 1.0
    await serve(build_app(source), config, shutdown_trigger=shutdown,  # type: ignore[arg-type]
                task_status=task_status)
