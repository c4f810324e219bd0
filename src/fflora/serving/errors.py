"""The one error shape every HTTP answer of `fflora serve` uses: OpenAI's
`{"error": {"message", "type", "param", "code"}}`, which the `openai` client turns into its exception classes."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailable"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON, with optional extra headers (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "Error"), "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    async def send_asgi(self, send) -> None:
        """Answer from plain ASGI code (a middleware that runs before FastAPI's handlers)."""
        payload = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   *((k.lower().encode(), str(v).encode()) for k, v in self.headers.items())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
