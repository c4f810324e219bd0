"""Offline generation: a list of prompts through a `SlotEngine` in the caller's thread, the outputs in
the prompts' order (what vLLM's `LLM.generate` is beside its server).

`fflora eval --engine slots` and the study's generate evaluations run on it. Continuous batching gives a
row to the next prompt as soon as its answer ends, where transformers' `generate` runs each batch as
long as its longest answer: on SmolLM2-135M's greedy math answers (16 rows, at most 160 new tokens) a
batch's rows held answers in 37% of its steps, and 48 AddSub items took 36 s here against 80 s, with the
same 48 answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from ..methods import BASE_NAME, FusedModel
from .slot_engine import SlotEngine


def inference_form(model: nn.Module) -> FusedModel:
    """The `FusedModel` the engine serves `model` from, built in place where it has none: a PEFT LoRA
    model merged into its base weights first (as its users serve it), an fflora adapter in training form
    fused, a plain model fused as it is. The model passed in is that form from then on."""
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return FusedModel.of(model) or FusedModel.build(model.eval())


def generate_all(fused: FusedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, slots: int = 8,
                 adapter: str = BASE_NAME) -> list[list[int]]:
    """The greedy tokens after each prompt (up to and with its end-of-sequence token, or `max_new_tokens`
    of them), `slots` prompts at a time, with a progress bar. RuntimeError if a step failed."""
    if not prompts:
        return []
    engine = SlotEngine(fused, slots=slots, max_len=max(map(len, prompts)) + max_new_tokens,
                        max_new_tokens=max_new_tokens)
    ids: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False)

    def finished() -> bool:
        left = engine.scheduled_requests()
        bar.update(len(prompts) - left - bar.n)
        return left == 0

    def queue_all() -> None:
        ids.extend(engine.add_request(prompt, adapter, max_new_tokens) for prompt in prompts)

    try:
        engine.run(until=finished, started=queue_all)
    finally:
        bar.close()
    return [engine.wait(request_id).generated_tokens for request_id in ids]
