"""Continuous batching over a fused adapter bank, built on transformers' ContinuousBatchingManager.

transformers' engine schedules requests, lets them join and leave the running batch between
steps, packs each step's tokens into one varlen row over a paged KV cache, and calls the model
from its own thread. What it lacks is adapters: here each request names an adapter of the bank,
and every forward call selects, per packed segment, the adapter of the request that segment
belongs to (`fflora.select_adapters` with the segment lengths). Adapters can be loaded and
unloaded while the engine runs. The engine knows nothing of HTTP; a server puts it behind an API.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from ..fastpath.compile import engine_compile_settings
from ..methods import BASE_NAME, FusedModel
from .outputs import until_finished

# Greedy requests keep only the top token (exact argmax) instead of switching the engine out of
# sampling mode, which transformers' engine sets once for all requests.
_GREEDY = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}


class _Aborted:
    """Delivered to a stream that `BankEngine.abort_all` ends: an output with an error, finished."""

    def __init__(self, message: str) -> None:
        self.error = message

    def is_finished(self) -> bool:
        return True


class _CallNow:
    """Stands in for the event loop transformers' output router hands outputs to: calls at once."""

    @staticmethod
    def call_soon_threadsafe(callback, *args):
        callback(*args)


_CALL_NOW = _CallNow()


def sampling_generation_config(base: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """A generation config under which each request can choose greedy decoding or its own temperature and top_p.

    transformers' engine creates a per-request temperature, top-k and top-p processor only when the
    config it starts with sets each to a non-default value; the values here are placeholders that
    every request of `BankEngine.add_request` overrides.
    """
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.update(do_sample=True, temperature=0.5, top_k=1, top_p=0.5, **overrides)
    return config


class BankEngine:
    """Requests for different adapters of one fused bank model, batched continuously.

        fused = FusedModel.build(model, max_adapters=8)
        with BankEngine(fused, sampling_generation_config(max_new_tokens=64)) as engine:
            rid = engine.add_request(prompt_ids, adapter="math", temperature=0.0)
            output = engine.wait(rid)            # transformers' GenerationOutput

    The `FusedModel` must have an adapter bank (`max_adapters`). While the engine runs, the model's
    forward selects adapters from the scheduled batch; `stop` restores it. Prefix caching is turned
    off: a cached prefix holds one adapter's keys and values.

    `compile=True` runs each step through transformers' compiled (varlen) path, the bank's windows
    fixed (`FusedModel.compile_engine`); `start` compiles first and records the time in
    `compile_seconds`. Measured slower than eager on a CPU (README, "Measured: the engine
    compiled"): transformers' paged KV cache breaks the graph at every layer.
    """

    def __init__(self, fused: FusedModel, generation_config: GenerationConfig | None = None,
                 continuous_batching_config: ContinuousBatchingConfig | None = None,
                 compile: bool = False) -> None:
        if not isinstance(fused, FusedModel):
            raise TypeError(f"BankEngine serves a FusedModel with an adapter bank, got a {type(fused).__name__}: "
                            "pass fflora.FusedModel.build(model, max_adapters=K)")
        self.fused, self.model = fused, fused.model
        self.bank = fused.bank
        if self.bank is None:
            raise ValueError("BankEngine needs an adapter bank: build the FusedModel with max_adapters=K")
        cb_config = continuous_batching_config or ContinuousBatchingConfig()
        cb_config = fused.compile_engine(cb_config) if compile else copy.deepcopy(cb_config)
        self.compiled = compile
        cb_config.allow_block_sharing = False
        cb_config.per_request_processors = True
        self.compile_seconds: float | None = None  # the warm-up's compile time, once started
        # torch's compile settings are context variables, which a new thread does not inherit: the
        # engine's thread (and the warm-up) run in a copy of this thread's context, holding the
        # compiled step's settings.
        self._context = contextvars.copy_context()
        if compile:
            self._context.run(engine_compile_settings)
        self.generation_config = generation_config if generation_config is not None else sampling_generation_config()
        self._per_request_sampling = bool(self.generation_config.do_sample)
        self._lock = threading.Lock()  # guards the tables below (server threads, the engine's thread)
        self._adapter_of: dict[str, str] = {}  # request id -> adapter, for requests not yet finished
        self._retiring: set[str] = set()  # unloaded adapters that still have requests running
        self._outputs: dict[str, queue.SimpleQueue] = {}  # request id -> its outputs, for `results`
        self._streams: dict[str, object] = {}  # request id -> the `put` of a running `stream`, for `abort_all`
        self.manager = self.model.init_continuous_batching(generation_config=self.generation_config,
                                                      continuous_batching_config=cb_config)
        self.manager._run_generation_loop = functools.partial(self._context.run, self.manager._run_generation_loop)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> BankEngine:
        """Start the engine's thread; a compiled engine first compiles its steps (`compile_seconds`)."""
        # The engine's thread calls model(**batch): an instance attribute shadows the class's forward.
        self.model.forward = self._forward
        warm_up = self.compiled and not self.manager.warmed_up
        began = time.perf_counter()
        if warm_up:  # transformers' warm-up: a step of max_batch_tokens on dummy requests (prefill shapes)
            self._context.run(self.manager.warmup)
        self.manager.start()
        if warm_up:  # and a short request, for the decode steps' shapes
            self.wait(self.add_request([0] * 4, max_new_tokens=3, ignore_eos=True))
            self.compile_seconds = time.perf_counter() - began
        return self

    def stop(self) -> None:
        self.manager.stop(block=True)
        self.model.__dict__.pop("forward", None)
        if self.bank.step.fixed:
            self.bank.hold(None)
        self._delete_retired()

    def __enter__(self) -> BankEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kv_usage(self) -> dict[str, int]:
        """KV-cache usage for `/metrics`: none reported (transformers' paged cache keeps its own books)."""
        return {}

    def eos_token_ids(self) -> set[int]:
        """The tokens that end a request (its generation config's)."""
        eos = self.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def is_running(self) -> bool:
        """True while the generation thread runs (False once stopped, or after an error killed it)."""
        return self.manager.is_running()

    # -- adapters ----------------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """The adapters new requests can use, in load order."""
        with self._lock:
            return self._available()

    def _available(self) -> list[str]:  # the caller holds the lock
        return [name for name in self.bank.names() if name not in self._retiring]

    def load_adapter(self, path, name: str, strict: bool = False) -> None:
        """Load the adapter saved in `path` as `name`; running requests pause for the write (milliseconds).

        Raises ValueError (bank unchanged) for a bad name, a full bank, or a missing, corrupt or
        mismatched adapter, as `FusedModel.load` does.
        """
        with self._paused():
            self._delete_retired()  # unloaded adapters whose requests are done free their room first
            if name in self._retiring:
                raise ValueError(f"adapter {name!r} was unloaded and still has requests running; load it again "
                                 "once they finish, or under another name")
            self.fused.load(name, path, strict=strict)

    def unload_adapter(self, name: str) -> None:
        """Stop taking requests for `name`; its rows are freed once its running requests finish.

        Raises KeyError (listing the loaded adapters) when no adapter `name` is loaded.
        """
        with self._lock:
            if name not in self.bank.names() or name in self._retiring:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded adapters: {self._available()}")
            self._retiring.add(name)
        with self._paused():
            self._delete_retired()  # if it has running requests, the engine's thread deletes it after them

    def _paused(self):
        """Hold the engine between two steps (nothing to hold when it is stopped)."""
        return self.manager.pause() if self.is_running() else contextlib.nullcontext()

    def running_requests(self) -> Counter:
        """Unfinished requests per adapter (queued or in the batch)."""
        with self._lock:
            return Counter(self._adapter_of.values())

    def scheduled_requests(self) -> int:
        """Requests the scheduler holds (waiting or in the batch); a cancelled one leaves at the next step."""
        processor = getattr(self.manager, "batch_processor", None)
        if processor is None:
            return 0
        return len(processor.scheduler.active_requests) + len(processor.scheduler.waiting_requests)

    def _delete_retired(self) -> None:
        """Delete the unloaded adapters that no unfinished request uses; call between engine steps."""
        with self._lock:
            busy = set(self._adapter_of.values())
            done = [name for name in self._retiring if name not in busy]
            for name in done:
                self.bank.delete(name)
                self._retiring.discard(name)

    # -- requests ----------------------------------------------------------------------------------

    def add_request(self, input_ids: Sequence[int], adapter: str = BASE_NAME, max_new_tokens: int | None = None,
                    streaming: bool = False, request_id: str | None = None, temperature: float | None = None,
                    top_p: float | None = None, ignore_eos: bool = False) -> str:
        """Queue a request for `adapter` (a loaded adapter's name, or "__base__"); returns its id.

        `ignore_eos` generates exactly `max_new_tokens` (benchmarks fix output lengths this way).
        `temperature` None or 0 decodes greedily; other temperatures and top_p need an engine
        started with a sampling config (the default, see `sampling_generation_config`).
        """
        outputs = queue.SimpleQueue()
        request_id = self._submit(input_ids, adapter, max_new_tokens, streaming, request_id or f"req-{uuid.uuid4().hex}",
                                  temperature, top_p, ignore_eos, outputs.put)
        with self._lock:
            self._outputs[request_id] = outputs
        return request_id

    def _submit(self, input_ids, adapter, max_new_tokens, streaming, request_id, temperature, top_p, ignore_eos,
                put) -> str:
        """Validate, record the request's adapter, route its outputs to `put`, then queue it."""
        sampling = self._sampling_kwargs(temperature, top_p)
        with self._lock:
            if adapter != BASE_NAME and (adapter not in self.bank.names() or adapter in self._retiring):
                raise ValueError(f"no adapter named {adapter!r} is loaded; loaded adapters: {self._available()} "
                                 f"(and {BASE_NAME!r} for the base model)")
            self._adapter_of[request_id] = adapter  # known before the scheduler can see the request
        self._deliver_to(request_id, put)
        added = self.manager.add_request(list(input_ids), request_id=request_id, max_new_tokens=max_new_tokens,
                                         streaming=streaming, eos_token_id=-1 if ignore_eos else None, **sampling)
        if added is None:
            self._release(request_id)
            raise RuntimeError("the engine does not accept requests (stopped, or stopped by an error)")
        return request_id

    def _sampling_kwargs(self, temperature: float | None, top_p: float | None) -> dict:
        if not self._per_request_sampling:
            if temperature or (top_p is not None and top_p != 1.0):
                raise ValueError("this engine decodes greedily for every request (its generation config has "
                                 "do_sample=False); start it with fflora.serving.sampling_generation_config() "
                                 "to choose temperature and top_p per request")
            return {}
        if not temperature:
            return dict(_GREEDY)
        vocab = self.model.config.get_text_config().vocab_size
        return {"temperature": float(temperature), "top_k": vocab, "top_p": float(1.0 if top_p is None else top_p)}

    def _deliver_to(self, request_id: str, put) -> None:
        """Hand each output of the request to `put` (thread-safe), on the engine's thread.

        A handler per request: with transformers' shared output queue, a reader of one request
        spins taking and putting back the outputs of all the others. Every handler is called
        directly (`_CALL_NOW`): the router runs a step's handlers through one "loop", so mixing
        asyncio loops and plain queues must not depend on which one it picks.
        """
        with self.manager.output_router._lock:
            self.manager.output_router.result_handlers[request_id] = (put, _CALL_NOW)

    def results(self, request_id: str, timeout_s: float = 0.5):
        """The outputs of one request as they come (one per new token when streaming), the last finished.

        Ends early, without a finished output, if the engine stops."""
        outputs = self._outputs.get(request_id)
        if outputs is None:
            raise KeyError(f"no request {request_id!r} to read: unknown, already read to the end, or one that "
                           "`stream` runs")
        try:
            yield from until_finished(outputs, self.is_running, timeout_s)
        finally:
            self._release(request_id)

    def wait(self, request_id: str):
        """The finished output of one request."""
        output = None
        for output in self.results(request_id):
            pass
        if output is None or not output.is_finished():
            raise RuntimeError(f"request {request_id} did not finish: the engine stopped ({output and output.status})")
        return output

    async def stream(self, input_ids: Sequence[int], adapter: str = BASE_NAME, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     ignore_eos: bool = False) -> AsyncIterator:
        """Run one request from asyncio code: yields an output per new token, the last one finished.

        Leaving the loop early (a client that went away, a stop string) cancels the request and
        frees its place in the batch. A request the engine failed raises RuntimeError.
        """
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = f"req-{uuid.uuid4().hex}"
        put = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, outputs.put_nowait)
        finished = False
        try:
            with self._lock:
                self._streams[request_id] = put
            self._submit(input_ids, adapter, max_new_tokens, True, request_id, temperature, top_p, ignore_eos, put)
            while not finished:
                output = await outputs.get()
                if output.error:
                    raise RuntimeError(output.error if isinstance(output, _Aborted) else f"generation failed: {output.error}")
                finished = output.is_finished()
                yield output
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.cancel(request_id)
            self._release(request_id)

    def abort_all(self, message: str) -> int:
        """End every running `stream` now: each raises RuntimeError(`message`) and its request is
        cancelled (a server's shutdown deadline). Returns how many were ended."""
        with self._lock:
            streams = list(self._streams.items())
        for request_id, put in streams:
            put(_Aborted(message))
            self.manager.cancel_request(request_id)
        return len(streams)

    def cancel(self, request_id: str) -> None:
        """Drop a request from the queue or the running batch."""
        self.manager.cancel_request(request_id)
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        with self._lock:
            self._adapter_of.pop(request_id, None)
            self._outputs.pop(request_id, None)
        with self.manager.output_router._lock:  # a cancelled request never delivers its last output
            self.manager.output_router.result_handlers.pop(request_id, None)

    def _forward(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.bank.step.fixed:  # fixed windows (compiled): the selection is held, made outside the graph
            self._hold_selection(input_ids.shape[-1])
            return type(self.model).forward(self.model, *args, **kwargs)
        names, lengths = self._segments(input_ids.shape[-1])
        # Adapters stay where they are: the batch's set changes as requests come and go, and moving
        # adapters to the front of the bank rewrites every adapter that shifts (~16 ms each on SmolLM2).
        with self.bank.selected(names, lengths=lengths, rearrange=False):
            return type(self.model).forward(self.model, *args, **kwargs)

    @torch.compiler.disable
    def _hold_selection(self, tokens: int) -> None:
        names, lengths = self._segments(tokens)
        self.bank.hold(self.bank.selection(names, lengths=lengths, rearrange=False))

    def _segments(self, tokens: int) -> tuple[list[str], list[int]]:
        """The adapter and token count of each request in the step's packed row of `tokens` tokens."""
        batch = self.manager.batch_processor.inputs_and_outputs.requests_in_batch
        with self._lock:
            names = [self._adapter_of.get(f.state.request_id, BASE_NAME) for f in batch]
        if self._retiring:
            self._delete_retired()
        lengths = [f.query_length for f in batch]
        padding = tokens - sum(lengths)  # static-shape (compiled) engines pad the packed row
        if padding > 0:
            names, lengths = [*names, BASE_NAME], [*lengths, padding]
        return names, lengths
