"""OpenAI request bodies, validation into engine parameters, and OpenAI-style errors."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from epkit.engine.sequence import SamplingParams


class ApiError(Exception):
    """An error to return as OpenAI-style JSON: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    @property
    def type(self) -> str:
        return {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(self.status, "InternalServerError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: choices carry the generated token ids

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def sampling_params(self, prompt_len: int, max_model_len: int, requested_max: int | None) -> SamplingParams:
        """Check limits against the context window and build :class:`SamplingParams`."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported by the built-in engine; use n=1", "n")
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty", "prompt")
        if prompt_len >= max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                                f"has {prompt_len} tokens, leaving no room for output. Please shorten the prompt.", "prompt")
        max_tokens = requested_max if requested_max is not None else max_model_len - prompt_len
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens={max_tokens} must be at least 1", "max_tokens")
        if prompt_len + max_tokens > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                "completion). Please reduce the prompt or max_tokens.", "max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                seed=self.seed,
                ignore_eos=self.ignore_eos,
                stop_token_ids=tuple(self.stop_token_ids or ()),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def prompts_of(request: CompletionRequest) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: strings or token-id lists."""
    p = request.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise ApiError(400, "prompt is empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)
