"""Requests to engine calls, engine outputs to OpenAI's fields: `OpenAIServing`, the layer under the
HTTP routes of `api_server` (as vLLM's `serving_*` classes are under its `api_server`).

It routes a request's `model` to the engine and adapter that serve it, checks and tokenizes the
prompt (off the event loop), bounds the tokens asked for by the context, admits the request to the
waiting line (`admission`), streams the engine's tokens back as text deltas with their finish
reason, counts them in `/metrics`, loads and unloads adapters at run time (`adapter_policy`), and
drains on shutdown. It knows requests, not routes, sockets or streams of events: every refusal is an
`errors.APIError` (OpenAI's error body and its status), which the routes return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing

from fastapi.concurrency import run_in_threadpool

from ..methods import BASE_NAME
from ..methods.adapter_files import BaseModelMismatchError
from ..utils.sources import say
from .adapter_policy import AdapterRoots, adapter_name_problem
from .admission import Admission, Overloaded
from .errors import APIError
from .lora import is_lora
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, SamplingRequest,
                       UnloadLoRAAdapterRequest)
from .slot_engine import SlotEngine
from .text import TextStream

LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log, with the request id on every line


class OpenAIServing:
    """Requests to engine calls and engine outputs to OpenAI responses, for one base model: its FFBA
    adapters in the bank of `engine`, and LoRA adapters merged into copies of it, one engine each
    (`merged`: model name -> engine; `fflora.serving.lora`)."""

    def __init__(self, engine: SlotEngine, tokenizer, model_name: str, max_model_len: int,
                 default_max_tokens: int = 256, roots: AdapterRoots | None = None,
                 admission: Admission | None = None, merged: dict[str, SlotEngine] | None = None) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.merged = dict(merged or {})
        self.model_name, self.max_model_len, self.default_max_tokens = model_name, max_model_len, default_max_tokens
        self.roots = roots or AdapterRoots(enabled=False, roots=[])
        self.admission = admission or Admission(max_requests=128, max_tokens=65536)
        # No token is longer than this many characters, so a text longer than max_model_len times it has
        # too many tokens for the context: refused before tokenizing.
        self.max_prompt_chars = max_model_len * max(map(len, tokenizer.get_vocab()))
        self._adapter_lock = asyncio.Lock()  # one load or unload at a time
        self.metrics = ServerMetrics(self)
        self.draining = False  # set on shutdown: no new requests

    # -- models and adapters -----------------------------------------------------------------------

    def models(self) -> dict:
        created = int(time.time())
        base = {"id": self.model_name, "object": "model", "created": created, "owned_by": "fflora",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "fflora",
                     "root": name, "parent": self.model_name}  # no server paths
                    for name in [*self.engine.adapters(), *self.merged]]
        return {"object": "list", "data": [base, *adapters]}

    def engines(self) -> list[SlotEngine]:
        return [self.engine, *self.merged.values()]

    def route(self, model: str) -> tuple[SlotEngine, str]:
        """The engine that serves `model`, and the adapter of its bank that does."""
        if model == self.model_name:
            return self.engine, BASE_NAME
        if model in self.merged:
            return self.merged[model], BASE_NAME
        if model in self.engine.adapters():
            return self.engine, model
        available = [self.model_name, *self.engine.adapters(), *self.merged]
        raise APIError(404, f"The model '{model}' does not exist. Available models: {available}", param="model")

    def _runtime_loading(self) -> None:
        if not self.roots.enabled:
            raise APIError(403, "loading and unloading adapters at run time is off on this server; start it with "
                                "--enable-adapter-loading --adapter-root DIR")

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        self._runtime_loading()
        problem = adapter_name_problem(body.lora_name, self.model_name)
        if problem:
            raise APIError(400, problem, "lora_name")
        try:
            path = self.roots.resolve(body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from e
        async with self._adapter_lock:
            if body.lora_name in [*self.engine.adapters(), *self.merged]:
                raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
            try:
                if is_lora(path):
                    raise ValueError("a PEFT LoRA adapter is served merged into a copy of the base weights, loaded "
                                     "at start only: restart the server with --adapter NAME=PATH")
                await run_in_threadpool(self.engine.load_adapter, path, body.lora_name,
                                        strict=not body.allow_base_mismatch)
            except (ValueError, FileNotFoundError, OSError) as e:
                reason = self.roots.without_paths(str(e), path, body.lora_path)
                if isinstance(e, BaseModelMismatchError) and not body.allow_base_mismatch:
                    reason += "; send allow_base_mismatch: true to load it anyway"
                LOG.warning("adapter %r from %r not loaded: %s", body.lora_name, body.lora_path, reason)
                raise APIError(400, f"could not load adapter '{body.lora_name}' from {body.lora_path!r}: {reason}",
                               "lora_path") from e
        self.metrics.loads.inc()
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        self._runtime_loading()
        if body.lora_name in self.merged:
            raise APIError(400, f"'{body.lora_name}' is a LoRA adapter served merged, from start to stop; restart "
                                "the server without it", "lora_name")
        async with self._adapter_lock:
            try:
                await run_in_threadpool(self.engine.unload_adapter, body.lora_name)
            except KeyError as e:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found. ({e.args[0]})",
                               "lora_name") from e
        self.metrics.unloads.inc()
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    # -- generation --------------------------------------------------------------------------------

    def check_prompt_size(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """Refuse a text prompt that cannot fit the context before spending time on tokenizing it."""
        if isinstance(body, CompletionRequest):
            chars = len(body.prompt) if isinstance(body.prompt, str) else 0  # token ids are checked after
        else:
            chars = sum(len(m.text()) for m in body.messages)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than fit this model's context of "
                                f"{self.max_model_len} tokens", prompt_field(body))

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        """The prompt's token ids (tokenizing and chat templating: run it off the event loop)."""
        if isinstance(body, CompletionRequest):
            if isinstance(body.prompt, list):
                vocab = self.engine.model.config.get_text_config().vocab_size
                if not all(0 <= t < vocab for t in body.prompt):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
                return body.prompt
            return self.tokenizer(body.prompt)["input_ids"]
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"the model '{self.model_name}' has no chat template; use /v1/completions",
                           "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def max_new_tokens(self, body: SamplingRequest, limit: int | None, prompt_len: int) -> int:
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", prompt_field(body))
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model takes at most "
                           f"{self.max_model_len - 1} so that one token can be generated", prompt_field(body))
        if limit is None:
            return min(self.default_max_tokens, room)
        if limit > room:
            raise APIError(400, f"max_tokens={limit} plus the prompt's {prompt_len} tokens exceeds the model's "
                           f"context of {self.max_model_len} tokens; ask for at most {room}", "max_tokens")
        return limit

    async def generate(self, body: CompletionRequest | ChatCompletionRequest):
        """Yields (text delta, finish_reason or None, prompt tokens, completion tokens) as tokens come."""
        arrived = time.monotonic()
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance")
        engine, adapter = self.route(body.model)
        self.check_prompt_size(body)
        ids = await run_in_threadpool(self.prompt_ids, body)
        limit = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
        max_new = self.max_new_tokens(body, limit, len(ids))
        text = TextStream(self.tokenizer, body.stop)
        try:
            ticket = self.admission.admit(len(ids))
        except Overloaded as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", headers={"Retry-After": "1"}) from e
        stream = engine.stream(ids, adapter, max_new_tokens=max_new, temperature=body.temperature,
                               top_p=body.top_p, ignore_eos=body.ignore_eos, seed=body.seed)
        seen, last, reason = 0, arrived, "abort"  # "abort" unless it finishes
        try:
            async with aclosing(stream):  # leaving early (stop string, client gone) cancels the request
                async for output in stream:
                    ticket.started()  # running: its place in the line is free
                    tokens, finished = output.generated_tokens, output.is_finished()
                    last, seen = (self._observe_tokens(body.model, len(tokens) - seen, arrived, last, first=not seen),
                                  len(tokens))
                    delta = text.update(tokens, final=finished)
                    if text.stopped:
                        reason = "stop"
                        yield delta, reason, len(ids), len(tokens)
                        return
                    if finished:
                        reason = output.finish_reason
                    yield delta, reason if finished else None, len(ids), len(tokens)
        except RuntimeError as e:
            raise APIError(503 if self.draining or not engine.is_running() else 500, str(e)) from e
        finally:
            ticket.started()
            self._observe_end(body.model, arrived, len(ids), reason)

    def _observe_tokens(self, model: str, new: int, arrived: float, last: float, first: bool) -> float:
        """Record `new` tokens of a request for `model` arriving now; returns now."""
        now = time.monotonic()
        if new > 0:
            (self.metrics.ttft if first else self.metrics.itl).observe((now - arrived) if first else (now - last) / new)
            self.metrics.generation_tokens.inc(new)
            self.metrics.model_tokens.labels(model=model).inc(new)
        return now if new > 0 else last

    def _observe_end(self, model: str, arrived: float, prompt_tokens: int, reason: str) -> None:
        self.metrics.e2e.observe(time.monotonic() - arrived)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.success.labels(finished_reason=reason).inc()
        self.metrics.model_requests.labels(model=model).inc()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, give running ones `timeout_s` to finish, then end the rest with an error."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while any(e.running_requests() for e in self.engines()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ended = sum(e.abort_all(f"the server shut down ({timeout_s:g} s after it was asked to)") for e in self.engines())
        if ended:
            say(f"shutdown: ended {ended} running request(s) after the {timeout_s:g} s deadline")


def prompt_field(body: SamplingRequest) -> str:
    """The request field that holds the prompt, for error messages."""
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
