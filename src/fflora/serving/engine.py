"""Continuous batching over a fused adapter bank, built on transformers' ContinuousBatchingManager.

transformers' engine schedules requests, lets them join and leave the running batch between
steps, packs each step's tokens into one varlen row over a paged KV cache, and calls the model
from its own thread. What it lacks is adapters: here each request names an adapter of the bank,
and every forward call selects, per packed segment, the adapter of the request that segment
belongs to (`fflora.select_adapters` with the segment lengths). The engine knows nothing of
HTTP; a server puts it behind an API.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from torch import nn

from ..bank import BASE_NAME, bank_of, select_adapters


class BankEngine:
    """Requests for different adapters of one fused bank model, batched continuously.

        with BankEngine(model, generation_config) as engine:
            rid = engine.add_request(prompt_ids, adapter="math", max_new_tokens=64)
            output = engine.wait(rid)            # transformers' GenerationOutput

    The model must have an adapter bank (`fflora.fuse(model, max_adapters=K)`). While the engine
    runs, the model's forward selects adapters from the scheduled batch; `stop` restores it.
    Load or delete adapters only while the engine is stopped: the bank's writes are not
    synchronised with the engine's thread.
    """

    def __init__(self, model: nn.Module, generation_config=None, continuous_batching_config=None) -> None:
        self.bank = bank_of(model)
        self.model = model
        self._adapter_of: dict[str, str] = {}
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=continuous_batching_config)

    def start(self) -> BankEngine:
        # The engine's thread calls model(**batch): an instance attribute shadows the class's forward.
        self.model.forward = self._forward
        self.manager.start()
        return self

    def stop(self) -> None:
        self.manager.stop(block=True)
        self.model.__dict__.pop("forward", None)

    def __enter__(self) -> BankEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_request(self, input_ids: Sequence[int], adapter: str = BASE_NAME, max_new_tokens: int | None = None,
                    streaming: bool = False, request_id: str | None = None) -> str:
        """Queue a request for `adapter` (a loaded adapter's name, or "__base__"); returns its id."""
        if adapter != BASE_NAME:
            self.bank.entry(adapter)  # ValueError listing the loaded adapters
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        self._adapter_of[request_id] = adapter  # known before the scheduler can see the request
        self.manager.add_request(list(input_ids), request_id=request_id, max_new_tokens=max_new_tokens, streaming=streaming)
        return request_id

    def results(self, request_id: str):
        """The outputs of one request as they come (one per new token when streaming), the last finished."""
        for output in self.manager.request_id_iter(request_id):
            if output.is_finished():
                self._adapter_of.pop(request_id, None)
            yield output

    def wait(self, request_id: str):
        """The finished output of one request."""
        output = None
        for output in self.results(request_id):
            pass
        if output is None or not output.is_finished():
            raise RuntimeError(f"request {request_id} did not finish: the engine stopped ({output and output.status})")
        return output

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)
        self._adapter_of.pop(request_id, None)

    def _forward(self, *args, **kwargs):
        batch = self.manager.batch_processor.inputs_and_outputs.requests_in_batch
        names = [self._adapter_of.get(f.state.request_id, BASE_NAME) for f in batch]
        lengths = [f.query_length for f in batch]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        padding = input_ids.shape[-1] - sum(lengths)  # static-shape engines pad the packed row
        if padding > 0:
            names, lengths = [*names, BASE_NAME], [*lengths, padding]
        with select_adapters(self.model, names, lengths=lengths):
            return type(self.model).forward(self.model, *args, **kwargs)
