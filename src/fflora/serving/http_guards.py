"""Protection at the HTTP level, before a request reaches the API: a Host allow-list (against DNS
rebinding of a server on this machine), a request-body limit, and a deadline for a request's headers.

The two checks are plain ASGI middleware rather than FastAPI's `@app.middleware("http")`: that one
wraps every response in a second task and would delay the disconnect detection streaming relies on.
Starlette's `TrustedHostMiddleware` does the host check but answers in plain text; every answer here
is OpenAI's error JSON (`errors.APIError`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError



def host_of(header: str) -> str:
    """The host part of a Host header ("[::1]:8000" -> "::1", "Example.com:80" -> "example.com")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowList:
    """Refuse (400) a request whose Host header names none of `hosts`; `hosts` None lets every host in."""

    def __init__(self, app, hosts: list[str] | None) -> None:
        self.app, self.hosts = app, None if hosts is None else {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.hosts is not None:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_of(header) not in self.hosts:
                error = APIError(400, f"the Host header {header!r} is not one this server answers to; start it with "
                                      "--allowed-host NAME to add one")
                return await error.send_asgi(send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request whose body is larger than `max_bytes`, before the API parses any of it.

    A declared Content-Length over the limit is refused without reading the body; a body without one
    (chunked) is read up to the limit and then handed on whole (FastAPI reads whole bodies anyway)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await APIError(400, "the Content-Length header is not a number").send_asgi(send)
            if int(declared) > self.max_bytes:
                return await self._too_large().send_asgi(send)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large().send_asgi(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: a disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn closes a kept-alive connection only while it sends nothing; one that sends a byte now and
    then without ever finishing its headers would hold a connection forever. Here every connection,
    and every kept-alive one after a response, must complete a request's headers within
    `header_timeout_s` or be closed. A request in progress (e.g. a long stream) is never cut."""

    header_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        armed_for = self.cycle  # a new request's headers replace the cycle

        def expire() -> None:
            if self.cycle is armed_for and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.header_timeout_s, expire)


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """The protocol class to hand uvicorn (`http=`), with this header deadline."""
    return type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout_s": timeout_s})
