"""The engine under `fflora serve`: a fixed number of static KV-cache slots over a `FusedModel`.

Each request takes a slot (`serving.slots`: its own rows of one preallocated KV cache) for its life.
A thread runs steps, and between two steps requests join free slots and leave finished ones
(continuous batching). A step is one prefill of at most `max_batch_tokens` prompt tokens (the next
chunk of the first waiting prompt, with as many others beside it as fit, each row right-padded to the
first's width), then one decode step of every running request together, each at its own position, each
row with its adapter (the bank's per-row selection): so a long prompt never holds running streams up by
more than one chunk, and a burst of short prompts is prefilled several at a time, not one per step.
Adapters load and unload between steps. Greedy rows take the argmax; sampled rows their own
temperature, top-p and random stream (a seed).

It offers what the API server uses of an engine (`stream`, `adapters`, `load_adapter`, `unload_adapter`,
`running_requests`, `scheduled_requests`, `abort_all`, `start`, `stop`, `is_running`) and `add_request` /
`results` / `wait` for code of one's own, and knows nothing of HTTP.

At start the engine plans the fused GEMMs for its decode batch sizes (`gemm_plan`, "auto" by default:
`FusedModel.plan` measures each weight shape's layout and operand order at 1 and `slots` rows, compiled
at `slots` rows only; a model planned already keeps its plan): on SmolLM2 here a decode step of 8 rows
took 57 ms planned against 89 unplanned, one row 50 either way.

`compile=True` runs each decode step compiled (`torch.compile` of `slots.slot_forward`): one graph for
every number of rows and every span of positions read (both dynamic sizes), the bank's windows fixed and
each row's adapter selection held outside the graph, compiled at start by the warm-up so that no request
waits on a compile (inductor's on-disk cache serves later starts). Dynamo specializes a size of 1, so a
step of one row runs two, the second a padding row in a scratch slot. Prefill chunks run eagerly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..fastpath.compile import engine_compile_settings
from ..methods import BASE_NAME, FusedModel
from ..ops.formats import MODES
from .slots import SlotCache, slot_forward, slot_step, use_slots

DEFAULT_SLOTS = 8
DEFAULT_MAX_BATCH_TOKENS = 256
MIN_COMPILED_ROWS = 2  # a compiled decode step pads its rows up to this (Dynamo specializes a size of 1)


@dataclass
class SlotOutput:
    """What a request has generated so far; `status` "running", "finished" or "failed" (`error` says why).
    A finished request's `finish_reason` is "stop" (it generated an end-of-sequence token it did not ignore)
    or "length" (it reached its max_new_tokens): the engine knows which, a reader of the tokens cannot (an
    `ignore_eos` request may end on an end-of-sequence token by its length)."""

    request_id: str
    generated_tokens: list[int]
    status: str = "running"
    error: str | None = None
    finish_reason: str | None = None

    def is_finished(self) -> bool:
        return self.status != "running"


@dataclass(eq=False)  # a request is itself: compared by identity
class _Request:
    request_id: str
    prompt: list[int]
    adapter: str
    max_new_tokens: int
    temperature: float | None
    top_p: float | None
    generator: torch.Generator | None  # the request's own random stream (`seed`), else torch's global one
    eos: frozenset[int]
    put: Callable[[SlotOutput], None]
    streaming: bool
    slot: int | None = None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False


class SlotEngine:
    """Requests for the adapters of one `FusedModel`, in `slots` static KV-cache slots of `max_len`
    positions each (prompt and generated tokens), batched continuously (see the module docstring).

        with SlotEngine(fflora.FusedModel.build(model, max_adapters=8), slots=8, max_len=1024) as engine:
            rid = engine.add_request(prompt_ids, adapter="math", max_new_tokens=64)
            tokens = engine.wait(rid).generated_tokens
    """

    def __init__(self, fused: FusedModel, slots: int = DEFAULT_SLOTS, max_len: int | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_new_tokens: int = 256,
                 eos_token_id: int | Sequence[int] | None = None, compile: bool = False,
                 gemm_plan: str = "auto") -> None:
        if not isinstance(fused, FusedModel):
            raise TypeError(f"SlotEngine serves a FusedModel, got a {type(fused).__name__}: pass fflora.FusedModel.build(model)")
        if gemm_plan not in MODES:
            raise ValueError(f"gemm_plan must be one of {list(MODES)}, got {gemm_plan!r}")
        for name, value in (("slots", slots), ("max_batch_tokens", max_batch_tokens), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.fused, self.model, self.bank = fused, fused.model, fused.bank
        device = next(self.model.parameters()).device
        if device.type != "cpu":  # the slots' KV cache and the GEMM plans are the CPU's
            raise ValueError(f"SlotEngine runs on the CPU; this model is on {device}: move it with model.to('cpu'), "
                             "or on a GPU serve it with vLLM and fflora's plugin (evaluate with engine 'transformers')")
        config = self.model.config.get_text_config()
        self.max_len = max_len or config.max_position_embeddings
        if self.max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} is past the model's {config.max_position_embeddings} positions")
        dtype = fused.gemms[0].activation_dtype if fused.gemms else torch.float32
        self.cache = SlotCache(self.model.config, slots + 1, self.max_len, dtype=dtype)
        self.scratch = slots  # the extra slot: a compiled step's padding row writes there
        self.compile, self.gemm_plan = compile, gemm_plan
        self._decoder = None  # the compiled decode step, once started with compile=True
        self.slots, self.max_batch_tokens, self.max_new_tokens = slots, max_batch_tokens, max_new_tokens
        eos = eos_token_id if eos_token_id is not None else self.model.generation_config.eos_token_id
        self.eos = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self._lock = threading.Lock()  # guards the request tables (callers' threads, the engine's thread)
        self._step_lock = threading.RLock()  # held for each step: adapter loads (and `paused`) wait for it to end
        self._waiting: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # slot -> its request
        self._outputs: dict[str, queue.SimpleQueue] = {}
        self._retiring: set[str] = set()  # unloaded adapters that still have requests running
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_run = False  # the loop runs in a caller's thread (`run`), not one of its own
        self.error: str | None = None  # why the engine's thread stopped, if a step failed
        self._attention = None  # the model's attention implementation, restored on stop
        self.warm_up_s: float | None = None  # seconds the steps before the first request took (`_warm_up`)
        self.plan_report: dict | None = None  # the GEMM plan made at start (`FusedModel.plan`), if one was

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> SlotEngine:
        """Prepare the step (`_prepare`) and run the engine's loop in a thread of its own."""
        if self._thread is not None:
            return self
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="fflora-slot-engine", daemon=True)
        self._thread.start()
        return self

    def run(self, until: Callable[[], bool], started: Callable[[], None] | None = None) -> None:
        """Run the engine's loop in the calling thread until `until()` is true or another thread calls
        `stop` (or a step fails: `error` says why), then stop; `started()` is called once the engine takes
        requests. What `fflora serve` does: PyTorch's steps run fastest in the thread that built the model.
        A decode step of 8 rows on SmolLM2 took 56 ms in the main thread that built the model, 78-100 ms
        in a second thread (1.4-1.8x), and 54-66 ms in a thread that had built the model itself (OpenMP's
        thread teams, one per thread that has run PyTorch, contend for the 2 cores)."""
        if self._thread is not None:
            raise RuntimeError("the engine is running already")
        self._prepare()
        self._thread, self._in_run = threading.current_thread(), True
        try:
            if started is not None:
                started()
            self._loop(until)
        finally:
            self._thread, self._in_run = None, False
            self._release()

    def stop(self) -> None:
        """Stop the engine (requests still running end failed) and give the model its attention back. An
        engine in `run` is asked to stop and stops there."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        if self._in_run:
            return  # `run`'s own loop ends and releases
        self._thread.join()
        self._thread = None
        self._release()

    def _prepare(self) -> None:
        """Plan the GEMMs (unless planned), route the model's attention through the slots, set up the
        compiled decode step if asked."""
        if self.gemm_plan != "standard" and self.fused.gemm_mode == "standard":
            # compiled, one graph runs every number of rows: one operand order per weight, the full batch's
            rows = (self.slots,) if self.compile else tuple(sorted({1, self.slots}))
            self.plan_report = self.fused.plan(self.gemm_plan, rows=rows)
        self._attention = self.model.config._attn_implementation
        use_slots(self.model)
        if self.compile and self._decoder is None:
            if self.bank is not None:
                self.bank.fix_windows()  # one graph for every mix of adapters, the selection held outside it
            self._decoder = torch.compile(functools.partial(slot_forward, self.model, self.cache), dynamic=False)
        self._stopping.clear()
        self.warm_up_s = self._warm_up()

    @torch.no_grad()
    def _warm_up(self) -> float:
        """Run, before the first request, the steps requests will run, in the scratch slot on the base model:
        a prompt step and a decode step of one row, and compiled, decode steps of the fewest and the most
        rows (the graph compiled now, from inductor's on-disk cache where an earlier start left it: then
        the time is Dynamo's tracing). Returns the seconds it took."""
        begun = time.perf_counter()
        scratch = torch.tensor([self.scratch])
        with self._selected([BASE_NAME]):
            slot_step(self.model, self.cache, scratch, torch.zeros(1, 2, dtype=torch.long))
            slot_step(self.model, self.cache, scratch, torch.zeros(1, 1, dtype=torch.long))
        if self._decoder is not None:
            engine_compile_settings()
            for count in sorted({MIN_COMPILED_ROWS, max(self.slots, MIN_COMPILED_ROWS)}):
                rows = scratch.repeat(count)
                self._graph_step(rows, self.cache.lengths[rows], torch.zeros(count, 1, dtype=torch.long),
                                 [BASE_NAME] * count, 2)
        self.cache.free(self.scratch)
        return time.perf_counter() - begun

    def _release(self) -> None:
        self.model.config._attn_implementation = self._attention
        self.abort_all("the engine stopped")

    def __enter__(self) -> SlotEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def paused(self) -> threading.RLock:
        """Hold the engine between two steps for the `with` block (what adapter loads do; re-entrant)."""
        return self._step_lock

    # -- adapters ----------------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """The adapters new requests can use, in load order."""
        return [] if self.bank is None else [n for n in self.bank.names() if n not in self._retiring]

    def load_adapter(self, path, name: str, strict: bool = False) -> None:
        """Load the adapter at `path` into the bank as `name`, between two steps (`FusedModel.load`)."""
        with self._step_lock:
            self._delete_retired()  # unloaded adapters whose requests are done free their room first
            if name in self._retiring:
                raise ValueError(f"adapter {name!r} was unloaded and still has requests running; load it again "
                                 "once they finish, or under another name")
            self.fused.load(name, path, strict=strict)

    def unload_adapter(self, name: str) -> None:
        """Stop taking requests for `name`; its rows are freed once its running requests finish. KeyError
        (listing the loaded adapters) when no adapter `name` is loaded."""
        with self._step_lock:
            if name not in self.adapters():
                raise KeyError(f"no adapter named {name!r} is loaded; loaded adapters: {self.adapters()}")
            self._retiring.add(name)
            self._delete_retired()

    def _delete_retired(self) -> None:
        """Delete the unloaded adapters no unfinished request uses (the caller holds the step lock)."""
        busy = self.running_requests()
        for name in [n for n in self._retiring if not busy.get(n)]:
            self.fused.unload(name)
            self._retiring.discard(name)

    # -- requests ----------------------------------------------------------------------------------

    def add_request(self, input_ids: Sequence[int], adapter: str = BASE_NAME, max_new_tokens: int | None = None,
                    streaming: bool = False, temperature: float | None = None, top_p: float | None = None,
                    ignore_eos: bool = False, seed: int | None = None) -> str:
        """Queue a request; returns its id (read its outputs with `results` or `wait`). A `seed` makes its
        sampling repeatable, whatever else runs beside it."""
        outputs = queue.SimpleQueue()
        request = self._request(input_ids, adapter, max_new_tokens, temperature, top_p, ignore_eos, seed, outputs.put,
                                streaming)
        with self._lock:
            self._outputs[request.request_id] = outputs
        self._queue(request)
        return request.request_id

    def _request(self, input_ids, adapter, max_new_tokens, temperature, top_p, ignore_eos, seed, put, streaming) -> _Request:
        """A checked request (ValueError naming what is wrong)."""
        prompt = [int(t) for t in input_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        # by default as many as the engine's max_new_tokens and the slot's room allow
        max_new = min(self.max_new_tokens, max(self.max_len - len(prompt), 1)) if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new!r}")
        if len(prompt) + max_new > self.max_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) and max_new_tokens ({max_new}) take "
                             f"{len(prompt) + max_new} positions; a slot holds {self.max_len} (--max-model-len)")
        if adapter != BASE_NAME and adapter not in self.adapters():  # unloaded ones included
            raise ValueError(f"no adapter named {adapter!r} is loaded; loaded adapters: {self.adapters()} "
                             f"(and {BASE_NAME!r} for the base model)")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return _Request(f"req-{next(self._ids)}", prompt, adapter, max_new, temperature or None, top_p, generator,
                        frozenset() if ignore_eos else self.eos, put, streaming)

    def _queue(self, request: _Request) -> None:
        if not self.is_running():
            raise RuntimeError("the engine does not accept requests (stopped" + (f": {self.error})" if self.error else ")"))
        with self._lock:
            self._waiting.append(request)
        self._wake.set()

    def results(self, request_id: str, timeout_s: float = 0.5):
        """The outputs of one request as they come (one per token when streaming), the last finished."""
        with self._lock:
            outputs = self._outputs.get(request_id)
        if outputs is None:
            raise KeyError(f"no request {request_id!r} to read: unknown, or already read to the end")
        try:
            while True:
                try:
                    output = outputs.get(timeout=timeout_s)
                except queue.Empty:
                    if self.is_running():
                        continue
                    return  # the engine stopped: no finished output will come
                yield output
                if output.is_finished():
                    return
        finally:
            with self._lock:
                self._outputs.pop(request_id, None)

    def wait(self, request_id: str) -> SlotOutput:
        """The finished output of one request (RuntimeError if it failed or the engine stopped)."""
        output = None
        for output in self.results(request_id):
            pass
        if output is None or output.status != "finished":
            raise RuntimeError(f"request {request_id} did not finish: {output.error if output else 'the engine stopped'}")
        return output

    async def stream(self, input_ids: Sequence[int], adapter: str = BASE_NAME, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     ignore_eos: bool = False, seed: int | None = None) -> AsyncIterator[SlotOutput]:
        """One request from asyncio code: an output per new token, the last finished. Leaving early cancels
        it (its slot frees at the next step); a failed request raises RuntimeError."""
        outputs: asyncio.Queue = asyncio.Queue()
        put = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, outputs.put_nowait)
        request = self._request(input_ids, adapter, max_new_tokens, temperature, top_p, ignore_eos, seed, put, True)
        self._queue(request)
        try:
            while True:
                output = await outputs.get()
                if output.status == "failed":
                    raise RuntimeError(output.error)
                yield output
                if output.is_finished():
                    return
        finally:
            request.cancelled = True
            self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot frees at the next step."""
        with self._lock:
            for request in (*self._waiting, *self._active.values()):
                if request.request_id == request_id:
                    request.cancelled = True
        self._wake.set()

    def running_requests(self) -> Counter:
        """Unfinished requests per adapter (waiting or in a slot)."""
        with self._lock:
            return Counter(r.adapter for r in (*self._waiting, *self._active.values()) if not r.cancelled)

    def scheduled_requests(self) -> int:
        """Requests waiting for a slot or holding one."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    def kv_usage(self) -> dict[str, int]:
        """KV-cache slots in use and free (what `/metrics` reports)."""
        with self._lock:
            used = len(self._active)
        return {"slots_used": used, "slots_free": self.slots - used}

    def abort_all(self, message: str) -> int:
        """End every unfinished request with `message` as its error; returns how many."""
        with self._lock:
            requests = [*self._waiting, *self._active.values()]
            self._waiting.clear()
            self._active.clear()
        for request in requests:
            request.cancelled = True
            request.put(SlotOutput(request.request_id, list(request.generated), "failed", message))
        return len(requests)

    # -- the engine's thread -----------------------------------------------------------------------

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        try:
            if self._decoder is not None:
                engine_compile_settings()  # torch's compile settings, in this thread
            while not self._stopping.is_set() and not (until is not None and until()):
                with self._step_lock, torch.no_grad():
                    worked = self._step()
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except Exception as e:  # a failed step ends every request with the reason, and the engine
            self.error = f"{type(e).__name__}: {e}"
            self.abort_all(f"generation failed: {self.error}")

    def _step(self) -> bool:
        """Admit, one prefill chunk, one decode step of every running request; False if there was nothing to do."""
        if self._retiring:
            self._delete_retired()
        with self._lock:
            for slot, request in list(self._active.items()):
                if request.cancelled:
                    del self._active[slot]
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
            free = [s for s in range(self.slots) if s not in self._active]
            while free and self._waiting:
                request = self._waiting.popleft()
                request.slot = free.pop(0)
                self.cache.free(request.slot)
                self._active[request.slot] = request
            active = list(self._active.values())
        prefilling = self._prefill_rows([r for r in active if r.prefilled < len(r.prompt) and not r.cancelled])
        if prefilling:
            self._prefill(prefilling)
        decoding = [r for r in active if r.generated and r not in prefilling and not r.cancelled]
        if decoding:
            self._decode(decoding)
        return bool(prefilling) or bool(decoding)

    def _prefill_rows(self, waiting: list[_Request]) -> list[_Request]:
        """The requests whose prompts advance this step, in order of arrival: the first one's next chunk
        (at most `max_batch_tokens`) sets the width, and as many after it join as fit in `max_batch_tokens`
        padded to that width (each its next chunk of at most that width; one whose padding would run past
        its slot waits for a later step)."""
        if not waiting:
            return []
        width = self._chunk_width(waiting[0])
        rows = [waiting[0]]
        for request in waiting[1:]:
            if (len(rows) + 1) * width > self.max_batch_tokens:
                break
            if request.prefilled + width <= self.max_len:
                rows.append(request)
        return rows

    def _chunk_width(self, request: _Request) -> int:
        """The length of `request`'s next prompt chunk, the width of a prefill step it leads."""
        return min(len(request.prompt) - request.prefilled, self.max_batch_tokens)

    def _prefill(self, requests: list[_Request]) -> None:
        """The next prompt chunk of each of `requests` in one step (right-padded to the longest); a request
        whose prompt is now in takes its first token."""
        width = self._chunk_width(requests[0])
        chunks = [r.prompt[r.prefilled : r.prefilled + width] for r in requests]
        ids = torch.tensor([chunk + [0] * (width - len(chunk)) for chunk in chunks])
        logits = self._run(requests, ids, torch.tensor([len(chunk) for chunk in chunks]))
        done = []
        for i, (request, chunk) in enumerate(zip(requests, chunks)):
            request.prefilled += len(chunk)
            if request.prefilled == len(request.prompt):
                done.append(i)
        if done:
            self._emit([requests[i] for i in done], logits[done])

    def _decode(self, requests: list[_Request]) -> None:
        if self._decoder is None:
            logits = self._run(requests, torch.tensor([[r.generated[-1]] for r in requests]))
        else:
            logits = self._compiled_decode(requests)
        self._emit(requests, logits)

    def _compiled_decode(self, requests: list[_Request]) -> Tensor:
        """One compiled decode step (one row padded to two: the padding row writes the scratch slot)."""
        n = len(requests)
        pad = max(MIN_COMPILED_ROWS - n, 0)
        rows = torch.tensor([r.slot for r in requests] + [self.scratch] * pad)
        starts = self.cache.lengths[rows]
        ids = torch.tensor([[r.generated[-1]] for r in requests] + [[0]] * pad)
        logits = self._graph_step(rows, starts, ids, [r.adapter for r in requests] + [BASE_NAME] * pad,
                                  int(starts.max()) + 1)
        self.cache.lengths[rows[:n]] = starts[:n] + 1
        return logits[:n]

    def _graph_step(self, rows: Tensor, starts: Tensor, ids: Tensor, adapters: list[str], span: int) -> Tensor:
        """The compiled decode graph over `len(rows)` rows (at least 2), reading `span` positions (at least 2),
        each row with its adapter: both sizes dynamic (Dynamo would specialize a size of 1)."""
        window = torch.arange(span)
        for tensor in (window, rows, starts, ids):
            torch._dynamo.mark_dynamic(tensor, 0)
        with self._selected(adapters):
            return self._decoder(rows, starts, ids, window)

    def _run(self, requests: list[_Request], input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        with self._selected([r.adapter for r in requests]):
            return slot_step(self.model, self.cache, torch.tensor([r.slot for r in requests]), input_ids, lengths)

    def _selected(self, names: list[str]):
        """Each row's adapter for the forward passes inside the block (nothing to choose without a bank).
        Adapters stay where they are: moving them would rewrite every adapter that shifts."""
        return contextlib.nullcontext() if self.bank is None else self.bank.selected(names, rearrange=False)

    def _emit(self, requests: list[_Request], logits: Tensor) -> None:
        """Choose each row's next token, hand each request its output, free the slots of finished ones."""
        for request, token in zip(requests, self._sample(requests, logits)):
            request.generated.append(token)
            reason = ("stop" if token in request.eos else
                      "length" if len(request.generated) >= request.max_new_tokens else None)
            if reason:
                with self._lock:
                    self._active.pop(request.slot, None)
            if reason or request.streaming:
                request.put(SlotOutput(request.request_id, list(request.generated),
                                       "finished" if reason else "running", finish_reason=reason))

    @staticmethod
    def _sample(requests: list[_Request], logits: Tensor) -> list[int]:
        """Greedy rows: the argmax (no sort); sampled rows: softmax(logits / temperature) within top_p."""
        tokens = logits.float().argmax(-1).tolist()  # bfloat16's argmax took 0.79 ms on 8 x 49152, float32's 0.35
        for i, request in enumerate(requests):
            if not request.temperature:
                continue
            probs = torch.softmax(logits[i].float() / request.temperature, -1)
            if request.top_p is not None and request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
            tokens[i] = int(torch.multinomial(probs, 1, generator=request.generator))
        return tokens
