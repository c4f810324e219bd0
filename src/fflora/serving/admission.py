"""A bounded waiting line in front of the engine: beyond it a request is refused at once (429 with
Retry-After) instead of waiting in an unbounded queue.

A request counts as waiting from its admission until its first token comes (or it fails or is
cancelled): the engine's queue plus its prefill. `max_requests` bounds their number, `max_tokens`
their prompt tokens (a request longer than `max_tokens` on its own is admitted when nothing waits:
it could never run otherwise)."""

from __future__ import annotations

import threading


class Overloaded(Exception):
    """The waiting line is full."""


class Admission:
    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.tokens = 0
        self._lock = threading.Lock()

    def admit(self, prompt_tokens: int) -> Ticket:
        """A place in the line for a prompt of `prompt_tokens`; Overloaded when there is none."""
        with self._lock:
            if self.requests + 1 > self.max_requests:
                raise Overloaded(f"{self.requests} requests are waiting (--max-queued-requests {self.max_requests})")
            if self.requests and self.tokens + prompt_tokens > self.max_tokens:
                raise Overloaded(f"{self.tokens} prompt tokens are waiting (--max-queued-tokens {self.max_tokens})")
            self.requests += 1
            self.tokens += prompt_tokens
        return Ticket(self, prompt_tokens)

    def _leave(self, prompt_tokens: int) -> None:
        with self._lock:
            self.requests -= 1
            self.tokens -= prompt_tokens


class Ticket:
    """One request's place in the line; `started()` gives it up (once: later calls do nothing)."""

    def __init__(self, admission: Admission, prompt_tokens: int) -> None:
        self._admission, self._tokens, self._left = admission, prompt_tokens, False

    def started(self) -> None:
        if not self._left:
            self._left = True
            self._admission._leave(self._tokens)
