"""Reading a request's outputs from the queue an engine's thread fills (both engines: `engine`, `slot_engine`)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator


def until_finished(outputs: queue.SimpleQueue, is_running: Callable[[], bool], timeout_s: float) -> Iterator:
    """The outputs put on `outputs` as they come, up to the finished one; ends early, without it, once the
    engine stops (`is_running` is asked whenever `timeout_s` passes without an output)."""
    while True:
        try:
            output = outputs.get(timeout=timeout_s)
        except queue.Empty:
            if is_running():
                continue
            return
        yield output
        if output.is_finished():
            return
