"""An OpenAI-compatible HTTP server over `BankEngine`: `fflora serve`.

A thin layer, like vLLM's entrypoints: it validates requests (`protocol`), turns prompts and
chat messages into token ids, hands them to the engine (which knows nothing of HTTP) and turns
its tokens back into OpenAI's JSON and server-sent events. The request's `model` names the
adapter; vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` change the set at run time.

With API keys (`--api-key`, `FFLORA_API_KEY`) every route but /health needs `Authorization: Bearer KEY`,
checked per route and compared in constant time; a missing or wrong key is a 401 in OpenAI's shape.

    GET  /health                  200 while the engine runs, 503 after it stopped (no key needed)
    GET  /v1/models               the base model, then every loaded adapter
    POST /v1/completions          text completion, streamed (SSE) or not
    POST /v1/chat/completions     chat completion through the tokenizer's chat template
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}
    POST /v1/unload_lora_adapter  {"lora_name"}
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import aclosing, asynccontextmanager

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import ContinuousBatchingConfig

from ..methods import BASE_NAME, fuse
from ..models.base_models import load_base_model
from ..utils.sources import say
from .engine import BankEngine, sampling_generation_config
from .protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, SamplingRequest,
                       UnloadLoRAAdapterRequest)
from .text import TextStream


class APIError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 500: "InternalServerError",
             503: "ServiceUnavailable"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.TYPES.get(self.status, "Error"), "param": self.param,
                 "code": self.status}
        return JSONResponse({"error": error}, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a malformed body, naming its field."""
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    field = ".".join(where) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return APIError(400, f"{field}: {message}" if field else message, param=field)


class OpenAIServing:
    """Requests to engine calls and engine outputs to OpenAI responses, for one base model."""

    def __init__(self, engine: BankEngine, tokenizer, model_name: str, max_model_len: int,
                 default_max_tokens: int = 256) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.max_model_len, self.default_max_tokens = model_name, max_model_len, default_max_tokens
        self.eos = set(_as_list(engine.generation_config.eos_token_id))
        self.adapter_paths: dict[str, str] = {}
        self._adapter_lock = asyncio.Lock()  # one load or unload at a time

    # -- models and adapters -----------------------------------------------------------------------

    def models(self) -> dict:
        created = int(time.time())
        base = {"id": self.model_name, "object": "model", "created": created, "owned_by": "fflora",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "fflora",
                     "root": self.adapter_paths.get(name, name), "parent": self.model_name}
                    for name in self.engine.adapters()]
        return {"object": "list", "data": [base, *adapters]}

    def adapter_for(self, model: str) -> str:
        if model == self.model_name:
            return BASE_NAME
        if model in self.engine.adapters():
            return model
        available = [self.model_name, *self.engine.adapters()]
        raise APIError(404, f"The model '{model}' does not exist. Available models: {available}", param="model")

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        if body.lora_name == self.model_name:
            raise APIError(400, f"'{body.lora_name}' is the base model's name; choose another lora_name", "lora_name")
        async with self._adapter_lock:
            if body.lora_name in self.engine.adapters():
                raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
            try:
                await run_in_threadpool(self.engine.load_adapter, body.lora_path, body.lora_name)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise APIError(400, f"could not load adapter '{body.lora_name}' from {body.lora_path!r}: {e}",
                               "lora_path") from e
            self.adapter_paths[body.lora_name] = body.lora_path
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        async with self._adapter_lock:
            try:
                await run_in_threadpool(self.engine.unload_adapter, body.lora_name)
            except KeyError as e:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found. ({e.args[0]})",
                               "lora_name") from e
            self.adapter_paths.pop(body.lora_name, None)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    # -- generation --------------------------------------------------------------------------------

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
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
            raise APIError(400, "the prompt is empty", "messages" if isinstance(body, ChatCompletionRequest) else "prompt")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model takes at most "
                           f"{self.max_model_len - 1} so that one token can be generated", "messages"
                           if isinstance(body, ChatCompletionRequest) else "prompt")
        if limit is None:
            return min(self.default_max_tokens, room)
        if limit > room:
            raise APIError(400, f"max_tokens={limit} plus the prompt's {prompt_len} tokens exceeds the model's "
                           f"context of {self.max_model_len} tokens; ask for at most {room}", "max_tokens")
        return limit

    async def generate(self, body: CompletionRequest | ChatCompletionRequest):
        """Yields (text delta, finish_reason or None, prompt tokens, completion tokens) as tokens come."""
        adapter = self.adapter_for(body.model)
        ids = self.prompt_ids(body)
        limit = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
        max_new = self.max_new_tokens(body, limit, len(ids))
        text = TextStream(self.tokenizer, body.stop)
        stream = self.engine.stream(ids, adapter, max_new_tokens=max_new, temperature=body.temperature,
                                    top_p=body.top_p, ignore_eos=body.ignore_eos)
        try:
            async with aclosing(stream):  # leaving early (stop string, client gone) cancels the request
                async for output in stream:
                    tokens, finished = output.generated_tokens, output.is_finished()
                    delta = text.update(tokens, final=finished)
                    if text.stopped:
                        yield delta, "stop", len(ids), len(tokens)
                        return
                    reason = None
                    if finished:
                        reason = "stop" if tokens and tokens[-1] in self.eos else "length"
                    yield delta, reason, len(ids), len(tokens)
        except RuntimeError as e:
            raise APIError(503 if not self.engine.is_running() else 500, str(e)) from e


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _chunk(body, rid: str, created: int, model: str, delta: str, reason, first: bool) -> dict:
    if isinstance(body, CompletionRequest):
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    content = {"role": "assistant", "content": delta} if first else {"content": delta}
    choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _answer(serving: OpenAIServing, body, request: Request):
    """The whole response, or an SSE stream; a client that goes away cancels its request."""
    chat = isinstance(body, ChatCompletionRequest)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    events = serving.generate(body)
    first = await anext(events)  # errors before the first token are still plain HTTP errors

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse():
            usage = None
            async with aclosing(events):
                is_first, item = True, first
                while item is not None:
                    delta, reason, n_prompt, n_completion = item
                    usage = _usage(n_prompt, n_completion)
                    if delta or reason or (chat and is_first):
                        yield _sse(_chunk(body, rid, created, body.model, delta, reason, is_first))
                        is_first = False
                    try:
                        item = await anext(events)
                    except StopAsyncIteration:
                        item = None
                    except APIError as e:
                        yield _sse({"error": {"message": e.message, "type": e.TYPES.get(e.status), "code": e.status}})
                        return
            if include_usage and usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": body.model, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def collect():
        parts, item = [first[0]], first
        async with aclosing(events):
            async for item in events:
                parts.append(item[0])
        return "".join(parts), item

    text, (_, reason, n_prompt, n_completion) = await _unless_disconnected(request, collect())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": _usage(n_prompt, n_completion)}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _unless_disconnected(request: Request, work, poll_s: float = 0.5):
    """Await `work`, cancelling it (and so its engine request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the connection")


def key_check(api_keys: list[str]):
    """A FastAPI dependency that admits a request bearing one of `api_keys` (none: every request).

    Every key is compared, each in constant time (`hmac.compare_digest`), so the time taken says nothing
    about which key or how much of one matched."""
    keys = [k.encode() for k in api_keys]

    async def require_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not any([hmac.compare_digest(given, key) for key in keys]):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'")

    return require_key


def build_app(serving: OpenAIServing, start_engine: bool = True, api_keys: list[str] | None = None) -> FastAPI:
    """The FastAPI application; it starts the engine on startup and stops it on shutdown. With `api_keys`
    every route but /health requires one of them (a dependency of each route, not a path prefix)."""
    authorized = [Depends(key_check(list(api_keys or [])))]

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            serving.engine.start()
        try:
            yield
        finally:
            if start_engine:
                await run_in_threadpool(serving.engine.stop)

    app = FastAPI(title="fflora", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # the process keeps serving; the client gets JSON
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.get("/health")
    async def health():
        if not serving.engine.is_running():
            raise APIError(503, "the engine has stopped")
        return {"status": "ok", "running_requests": sum(serving.engine.running_requests().values()),
                "scheduled_requests": serving.engine.scheduled_requests()}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return serving.models()

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(serving, body, request)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _answer(serving, body, request)

    @app.post("/v1/load_lora_adapter", dependencies=authorized)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        return PlainTextResponse(await serving.load(body))

    @app.post("/v1/unload_lora_adapter", dependencies=authorized)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return PlainTextResponse(await serving.unload(body))

    return app


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# transformers sizes the paged KV cache from free accelerator memory; on a CPU that is most of the
# RAM (12 GB per server here), so the cache is sized in tokens instead.
_PAGE_SIZE = 256


def run_server(model_name_or_path: str | None = None, adapters: dict[str, str] | None = None, max_adapters: int = 8,
               rank_budget: int | None = None, host: str = "127.0.0.1", port: int = 8000,
               served_model_name: str | None = None, dtype: str = "float32", max_batch_tokens: int | None = None,
               max_batch_requests: int | None = None, kv_cache_tokens: int = 32768,
               limit_max_requests: int | None = None, default_max_tokens: int = 256, log_level: str = "info",
               api_keys: list[str] | None = None) -> None:
    """Load the base model, fuse it with a bank of `max_adapters`, load `adapters` ({name: folder}), serve.
    With `api_keys`, every route but /health requires one of them.

    `kv_cache_tokens` is the paged KV cache's room, shared by the running requests (32768 tokens
    of SmolLM2-135M in float32 take 1.5 GB)."""
    model, tokenizer = load_base_model(model_name_or_path, dtype=getattr(torch, dtype))
    name = served_model_name or model.config._name_or_path or "base"
    fuse(model, max_adapters=max_adapters, rank_budget=rank_budget)
    engine = BankEngine(model, sampling_generation_config(model.generation_config),
                        ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens,
                                                 max_requests_per_batch=max_batch_requests,
                                                 num_blocks=-(-kv_cache_tokens // _PAGE_SIZE), page_size=_PAGE_SIZE))
    context = min(model.config.get_text_config().max_position_embeddings, kv_cache_tokens)
    serving = OpenAIServing(engine, tokenizer, name, context, default_max_tokens)
    for adapter, path in (adapters or {}).items():
        if adapter == name:
            raise ValueError(f"adapter name {adapter!r} is the base model's name; choose another")
        engine.load_adapter(path, adapter)
        serving.adapter_paths[adapter] = str(path)
    if not api_keys and host not in LOOPBACK_HOSTS:
        say(f"WARNING: serving on {host} without an API key: anyone who reaches port {port} can generate and "
            "load or unload adapters. Pass --api-key KEY (or set FFLORA_API_KEY)")
    uvicorn.run(build_app(serving, api_keys=api_keys), host=host, port=port, limit_max_requests=limit_max_requests,
                log_level=log_level)
