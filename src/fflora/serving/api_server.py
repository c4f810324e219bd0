"""An OpenAI-compatible HTTP server over `SlotEngine`: `fflora serve`.

A thin layer, like vLLM's entrypoints: routes that validate requests (`protocol`) and hand them to
`openai_serving.OpenAIServing` (prompts and chat messages to token ids, the engine's tokens to text;
the engine knows nothing of HTTP), then OpenAI's JSON and server-sent events around its text; and
the process: the model loaded and fused, the engine in the main thread, HTTP in another. The
request's `model` names the adapter; vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`
change the set at run time.

Hardened as vLLM's and TGI's servers are (`ServerConfig` holds every setting):

* API keys (`--api-key`, `FFLORA_API_KEY`): every route but /health needs `Authorization: Bearer KEY`,
  checked per route and compared in constant time; a missing or wrong key is a 401.
* Adapters: loading and unloading at run time is off unless `--enable-adapter-loading`, and then only
  from below an `--adapter-root` (`adapter_policy`); names are checked; an adapter saved on other base
  weights is refused unless the load allows it; no answer names a server path.
* Bounded work: a body limit (413) and a Host allow-list (`http_guards`), a deadline for request
  headers, a character bound checked before tokenizing, tokenization and chat templating off the event
  loop, chunked prefill (`--max-batch-tokens`), and a bounded waiting line (`admission`: 429 with
  Retry-After beyond it).

Every error, whatever its origin (a route that does not exist, a wrong method, a body that is not
JSON), is OpenAI's error JSON (`errors.APIError`); every response carries an `X-Request-Id`, which
every log line of the request shows (`request_ids`). On SIGTERM the server stops accepting, lets
running requests finish for up to `--shutdown-timeout` seconds, then ends the rest with an error
event and `[DONE]`, and exits 0 (`DrainingServer`).

    GET  /health                  200 while the engine runs, 503 after it stopped (no key needed)
    GET  /metrics                 Prometheus text format (`metrics`; no key needed)
    GET  /v1/models               the base model, then every loaded adapter
    POST /v1/completions          text completion, streamed (SSE) or not
    POST /v1/chat/completions     chat completion through the tokenizer's chat template
    POST /v1/load_lora_adapter    {"lora_name", "lora_path", "allow_base_mismatch"}  (--enable-adapter-loading)
    POST /v1/unload_lora_adapter  {"lora_name"}                                       (--enable-adapter-loading)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import threading
import time
import uuid
from contextlib import aclosing

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..methods import FusedModel
from ..models.base_models import load_base_model
from ..models.footprint import peak_resident_bytes
from ..utils.sources import say
from .adapter_policy import AdapterRoots, check_adapter_names
from .admission import Admission
from .config import ServerConfig
from .errors import APIError
from .http_guards import BodyLimit, HostAllowList, header_deadline_protocol
from .lora import is_lora, merged_lora
from .memory import describe_memory, memory_estimate, slot_length
from .metrics import CONTENT_TYPE
from .openai_serving import OpenAIServing
from .protocol import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .request_ids import RequestIds, log_config
from .slot_engine import SlotEngine


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a malformed body, naming its field."""
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    field = ".".join(where) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return APIError(400, f"{field}: {message}" if field else message, param=field)


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
                        yield _sse(e.body())
                        yield "data: [DONE]\n\n"
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


def build_app(serving: OpenAIServing, api_keys: list[str] | None = None, allowed_hosts: list[str] | None = None,
              max_request_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI application over `serving` (whose engines run elsewhere: `serve_in_main_thread`). With
    `api_keys` every route but /health requires one of them (a dependency of each route, not a path
    prefix); `allowed_hosts` (None: any) and `max_request_bytes` guard every route."""
    authorized = [Depends(key_check(list(api_keys or [])))]

    # With keys, no route answers without one: FastAPI's /docs, /redoc and /openapi.json are off.
    docs = {} if not api_keys else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fflora", **docs)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(HostAllowList, hosts=allowed_hosts)
    app.add_middleware(RequestIds)  # the outermost (added last): every answer carries its id

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # no such route (404), wrong method (405), ...
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # the process keeps serving; the client gets JSON
        if isinstance(exc, RecursionError):  # json.loads on a body nested thousands deep
            return APIError(400, "the request body is nested too deeply to parse").response()
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.get("/health")
    async def health():
        engines = serving.engines()
        if not all(e.is_running() for e in engines):
            raise APIError(503, "the engine has stopped")
        return {"status": "ok", "running_requests": sum(sum(e.running_requests().values()) for e in engines),
                "scheduled_requests": sum(e.scheduled_requests() for e in engines),
                "waiting_requests": serving.admission.requests}

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

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


def serving_engine(fused: FusedModel, cfg: ServerConfig) -> SlotEngine:
    """The engine over `fused` with the server's slots (`--max-num-seqs` of `--max-model-len` positions)."""
    return SlotEngine(fused, slots=cfg.max_num_seqs, max_len=slot_length(fused.model, cfg),
                      max_batch_tokens=cfg.max_batch_tokens, max_new_tokens=cfg.default_max_tokens, gemm_plan=cfg.gemm_plan,
                      compile=cfg.compile)


def bank_room(cfg: ServerConfig, loras: list[str]) -> int | None:
    """The bank's rank budget: `--rank-budget`; else, where no adapter can load at run time, the room the
    `--adapter` ones other than `loras` take (`FusedModel.room_for`: room nobody uses costs every step
    time), said in the log; else None, the default (16 per adapter). Reads every one of those adapters'
    configurations either way: called before the model loads, a folder that holds no adapter fails now."""
    room = FusedModel.room_for([path for adapter, path in cfg.adapters.items() if adapter not in loras])
    if cfg.rank_budget is not None or cfg.enable_adapter_loading:
        return cfg.rank_budget
    say(f"adapter bank: room for rank {room} per rank space, what the --adapter adapters take (no adapter loads at "
        "run time without --enable-adapter-loading; --rank-budget sets the room)")
    return room


def run_server(cfg: ServerConfig) -> None:
    """Bind the server's socket (`listening_socket`), load the base model, fuse it with a bank of
    `cfg.max_adapters` (its room: `bank_room`), load `cfg.adapters` (FFBA into the bank; LoRA merged into
    copies of the base, each its own model), print the memory the settings take, serve until stopped (or
    `cfg.limit_max_requests`)."""
    begun = time.monotonic()
    roots = AdapterRoots(cfg.enable_adapter_loading, cfg.adapter_roots)  # checked before the model loads
    check_adapter_names(cfg.adapters, cfg.served_model_name or "")
    with listening_socket(cfg.host, cfg.port) as sock:
        loras = [adapter for adapter, path in cfg.adapters.items() if is_lora(path)]
        room = bank_room(cfg, loras)
        runtime = peak_resident_bytes()
        model, tokenizer = load_base_model(cfg.model, dtype=getattr(torch, cfg.dtype))
        name = cfg.served_model_name or model.config._name_or_path or "base"
        check_adapter_names(cfg.adapters, name)  # the model's own name too, now that it is known
        merged = {adapter: merged_lora(model, cfg.adapters[adapter], cfg.weights) for adapter in loras}  # from the plain base
        fused = FusedModel.build(model, max_adapters=cfg.max_adapters, rank_budget=room, weights=cfg.weights)
        engine = serving_engine(fused, cfg)
        merged_engines = {adapter: serving_engine(m, cfg) for adapter, m in merged.items()}
        serving = OpenAIServing(engine, tokenizer, name, engine.max_len, cfg.default_max_tokens, roots,
                                Admission(cfg.max_queued_requests, cfg.max_queued_tokens), merged=merged_engines)
        for adapter, path in cfg.adapters.items():
            if adapter not in merged:
                engine.load_adapter(path, adapter, strict=not cfg.allow_base_mismatch)
            serving.metrics.loads.inc()  # counted from start: the --adapter ones too
        if merged:
            say(f"LoRA adapter(s) {', '.join(merged)}: merged into copies of the base weights, one engine each")
        say(describe_memory(memory_estimate(model, cfg, runtime, [m.model for m in merged.values()]), cfg, model))
        if not cfg.api_keys and not cfg.loopback:
            say(f"WARNING: serving on {cfg.host} without an API key: anyone who reaches port {cfg.port} can generate"
                + (" and load or unload adapters" if cfg.enable_adapter_loading else "")
                + ". Pass --api-key KEY (or set FFLORA_API_KEY)")
        app = build_app(serving, api_keys=cfg.api_keys, allowed_hosts=cfg.hosts(), max_request_bytes=cfg.max_request_bytes)
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, limit_max_requests=cfg.limit_max_requests,
                                log_level=cfg.log_level, log_config=log_config(), timeout_keep_alive=cfg.timeout_keep_alive_s,
                                http=header_deadline_protocol(cfg.header_timeout_s),
                                timeout_graceful_shutdown=cfg.shutdown_timeout_s + 2)  # a backstop past the drain
        serve_in_main_thread(engine, list(merged_engines.values()), DrainingServer(config, serving, cfg.shutdown_timeout_s),
                             sock, begun)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (as vLLM binds its own): a port in use or a host
    that is not this machine's fails in a second, not after minutes of loading, planning and compiling.
    uvicorn listens on it once the engine is ready; until then a connection is refused. The address
    family follows uvicorn's rule (`Config.bind_socket`, not called: it exits the process without naming
    the fix, and logs that it is running before the model has loaded)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e}; choose another --port or --host, or stop "
                         "what holds that port") from e
    return sock


def address(sock: socket.socket) -> str:
    """The URL a bound socket serves, its port as bound (--port 0: the one the system gave)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def serve_in_main_thread(engine: SlotEngine, others: list[SlotEngine], server: DrainingServer, sock: socket.socket,
                         begun: float) -> None:
    """The HTTP server (on `sock`, bound) in a thread of its own, the engine's steps in this (the main)
    thread, which built the model: there they run fastest (`SlotEngine.run`); the other engines (merged
    LoRA) in threads of their own. Once the engine is ready, SIGTERM and SIGINT start the drain, as
    uvicorn would in the main thread (before, they end the process as usual: there is nothing to drain,
    and a start that plans and compiles for minutes stops at Ctrl-C). Returns once the HTTP server has
    stopped, with every engine stopped. Says how long the start took (from `begun`, a `time.monotonic()`)."""
    failure: list[BaseException] = []

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # uvicorn exits with SystemExit where it cannot start
            failure.append(e)

    http = threading.Thread(target=serve_http, name="fflora-http")
    for other in others:
        other.start()

    def started() -> None:
        say(f"engine ready {time.monotonic() - begun:.1f} s after start (model, adapters, GEMM plan, warm-up steps: "
            f"{engine.warm_up_s:.1f} s{compiled_steps(engine)}); serving on {address(sock)}")
        packed = (engine.plan_report or {}).get("packed_bytes", 0)
        if packed:
            say(f"GEMM plan: {packed / 1e9:.2f} GB of weights also held packed for oneDNN (measured faster here)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
        http.start()

    try:
        engine.run(until=lambda: not http.is_alive(), started=started)
        if http.is_alive():  # the engine stopped on its own (a step failed): the server stops too
            server.handle_exit(signal.SIGTERM, None)
            http.join()
            raise RuntimeError(f"the engine stopped: {engine.error}")
    finally:
        for other in others:
            other.stop()
    if failure:
        raise failure[0]
    if not server.started:
        raise RuntimeError(f"the HTTP server did not start on {address(sock)} (see the log above)")


def compiled_steps(engine: SlotEngine) -> str:
    """What the warm-up compiled, and where inductor keeps it for the next start ("" when not compiled)."""
    if not engine.compile:
        return ""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return f", compiling the decode step (one graph for 2 to {max(engine.slots, 2)} rows); inductor's cache: {cache_dir()}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain deadline: on SIGTERM (or SIGINT) it stops accepting at once, gives
    running requests `shutdown_timeout_s` to finish, ends the rest with an error event and `[DONE]`,
    and exits with status 0 (uvicorn re-raises the signal after a graceful stop: exit 143)."""

    def __init__(self, config: uvicorn.Config, serving: OpenAIServing, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.serving, self.shutdown_timeout_s = serving, shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:  # a signal handler: hand the work to the event loop
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.serving.drain(self.shutdown_timeout_s)))
        self.should_exit = True  # not recorded in _captured_signals: nothing is re-raised, the exit status is 0
