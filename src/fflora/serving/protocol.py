"""The OpenAI (and vLLM adapter-endpoint) request bodies the server accepts, validated by pydantic.

Out-of-range values fail validation, and the server answers them with a 400 that names the
field. Parameters the engine cannot honour (n > 1, logprobs, penalties, tools...) are refused
the same way rather than silently ignored; fields this file does not name are ignored, as
OpenAI's and vLLM's servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

# Fields of OpenAI's API that the engine cannot honour, with the value that means "not used".
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
                "functions": (None, []), "response_format": (None,)}


class SamplingRequest(BaseModel):
    """What completions and chat completions share: the model (or adapter) and sampling."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stop: list[str] = Field(default_factory=list, description="a string or up to 4 strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
    seed: int | None = None  # repeatable sampling for this request

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for key, unused in _UNSUPPORTED.items():
                if data.get(key) not in unused:
                    raise ValueError(f"'{key}' is not supported by this server; leave it out")
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if isinstance(stops, list) and (len(stops) > 4 or not all(isinstance(s, str) and s for s in stops)):
            raise ValueError("stop takes a string or up to 4 non-empty strings")
        return stops


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] = Field(description="text, or token ids")
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], str)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (send a request per prompt: they are batched together)")
            prompt = prompt[0]
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="a folder below an --adapter-root (relative: taken below it)")
    allow_base_mismatch: bool = False  # fflora's extension: load an adapter saved on other base weights


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)


SamplingRequest.model_rebuild()
