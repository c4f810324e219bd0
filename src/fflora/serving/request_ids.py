"""A request id on every response (`X-Request-Id`) and in every log line of its request.

A client's own `X-Request-Id` (up to 64 characters of letters, digits, '.', '_', '-') is kept, so that
its logs and the server's line up; otherwise the server makes one. Plain ASGI middleware: the id is set
in a context variable before the app runs, so uvicorn's access log line and fflora's own log lines
for the request (`RequestIdFilter`) carry it.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import re
import uuid

from uvicorn.config import LOGGING_CONFIG

HEADER = b"x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("fflora_request_id", default="-")


class RequestIds:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(HEADER, b"").decode("latin-1")
        request_id = given if _VALID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        current_request_id.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the current request's, or "-") to every log record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


def log_config() -> dict:
    """uvicorn's logging configuration with the request id in every line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    config["formatters"]["access"]["fmt"] = ('%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" '
                                             "%(status_code)s")
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    return config
