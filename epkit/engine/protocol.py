"""OpenAI request bodies, validation into engine parameters, logprobs as vLLM returns them, OpenAI-style errors."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from epkit.engine.sequence import PositionLogprobs, SamplingParams

# vLLM request fields the built-in engine does not implement. A request that sets one to anything but its
# neutral value (or null) gets a 400 naming it: ignoring it would change what the answer means. Other
# unknown fields are logged once per name (``Api.log_ignored``) and ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "min_p": (0, 0.0),
    "min_tokens": (0,), "length_penalty": (1, 1.0), "logit_bias": ({},), "best_of": (1,), "use_beam_search": (False,),
    "suffix": ("",), "response_format": ({"type": "text"},), "structured_outputs": (), "guided_json": (),
    "guided_regex": (), "guided_choice": (), "guided_grammar": (), "tools": ([],), "allowed_token_ids": (),
    "bad_words": ([],), "logprob_token_ids": (), "prompt_logprob_token_ids": (), "truncate_prompt_tokens": (),
    "prompt_embeds": (), "continue_final_message": (False,), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "return_tokens_as_token_ids": (False,),
}
NO_LOGPROB = -9999.0  # what vLLM (and OpenAI) send for a logprob of -inf


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
    return_token_ids: bool = False  # vLLM's extension: choices carry the generated (and prompt) token ids
    prompt_logprobs: int | None = None  # vLLM's extension (not with stream)
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's extension: disaggregated prefill/decode

    def unknown_fields(self) -> list[str]:
        """Names of the request's fields the engine does not know (to log); raises ApiError (400) for a field of
        :data:`UNSUPPORTED` set to a value that would change the answer."""
        unknown = []
        for name, value in (self.model_extra or {}).items():
            if name not in UNSUPPORTED:
                unknown.append(name)
            elif value is not None and value not in UNSUPPORTED[name]:
                neutral = " or ".join(repr(v) for v in UNSUPPORTED[name]) or "null"
                raise ApiError(400, f"{name}={value!r} is not supported by the built-in engine (allowed: {neutral}, "
                                    "or leave it out)", name)
        return unknown

    def check_prompt_logprobs(self, max_logprobs: int, vocab_size: int) -> None:
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        check_logprobs("prompt_logprobs", self.prompt_logprobs, max_logprobs, vocab_size)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def kv_params(self, transfer_on: bool, prompts: int = 1) -> dict[str, Any] | None:
        """The request's ``kv_transfer_params`` for the engine (None when it asks no transfer), checked.

        Raises ApiError (400) naming the field when the engine has no ``--kv-transfer-config``, when both
        directions are asked, when a decode lacks where to pull from, or for several prompts or choices."""
        params = self.kv_transfer_params
        if not params or not (params.get("do_remote_decode") or params.get("do_remote_prefill")):
            return None
        if not transfer_on:
            raise ApiError(400, "kv_transfer_params asks a KV transfer, but this engine was started without "
                                "--kv-transfer-config", "kv_transfer_params")
        if params.get("do_remote_decode") and params.get("do_remote_prefill"):
            raise ApiError(400, "kv_transfer_params: do_remote_decode and do_remote_prefill cannot both be true",
                           "kv_transfer_params")
        if prompts != 1 or self.n != 1:
            raise ApiError(400, f"kv_transfer_params needs one prompt and n=1 (got {prompts} prompts, n={self.n})",
                           "kv_transfer_params")
        if params.get("do_remote_prefill"):
            missing = [k for k in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
                       if params.get(k) in (None, "")]
            if missing:
                raise ApiError(400, f"kv_transfer_params.do_remote_prefill=true needs {', '.join(missing)} (the "
                                    "prefill's response kv_transfer_params)", "kv_transfer_params")
            if not str(params["remote_port"]).isdigit():
                raise ApiError(400, f"kv_transfer_params.remote_port={params['remote_port']!r} must be a port number",
                               "kv_transfer_params")
            if params.get("tp_size", 1) != 1:
                raise ApiError(400, f"kv_transfer_params.tp_size={params['tp_size']!r}: the built-in engine pulls KV "
                                    "from prefills with tensor_parallel_size 1 only (its own)", "kv_transfer_params")
        return dict(params)

    def sampling_params(self, prompt_len: int, max_model_len: int, requested_max: int | None,
                        logprobs: int | None = None, echo_only: bool = False,
                        kv_transfer_params: dict[str, Any] | None = None) -> SamplingParams:
        """Check limits against the context window and build :class:`SamplingParams`.

        ``echo_only``: ``echo`` with ``max_tokens=0`` - vLLM generates one token and returns only the prompt."""
        if echo_only:
            requested_max = 1
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
                logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs,
                kv_transfer_params=kv_transfer_params,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc


def check_logprobs(name: str, value: int | None, max_logprobs: int, vocab_size: int) -> None:
    """vLLM's limits: -1 (the whole vocabulary) or 0..``--max-logprobs`` (-1 there: any)."""
    if value is None:
        return
    if value < -1:
        raise ApiError(400, f"`{name}` must be a positive value or -1.", name)
    wanted = vocab_size if value == -1 else value
    if max_logprobs != -1 and wanted > max_logprobs:
        raise ApiError(400, f"Requested {name} of {wanted}, which is greater than max allowed: {max_logprobs} "
                            "(--max-logprobs)", name)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token (the token itself is always included)

    def engine_logprobs(self, max_logprobs: int, vocab_size: int) -> int | None:
        """The logprobs to ask the engine for; echo + logprobs also asks for the prompt's (as vLLM does)."""
        check_logprobs("logprobs", self.logprobs, max_logprobs, vocab_size)
        self.check_prompt_logprobs(max_logprobs, vocab_size)
        if self.echo and self.prompt_logprobs is None and self.logprobs is not None:
            self.prompt_logprobs = self.logprobs  # streams too: the echoed prompt's tokens carry theirs
        return self.logprobs


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
    logprobs: bool = False
    top_logprobs: int | None = 0
    echo: bool = False  # vLLM's extension: the reply starts with the last message if it is the assistant's
    add_generation_prompt: bool = True

    def engine_logprobs(self, max_logprobs: int, vocab_size: int) -> int | None:
        """The logprobs to ask the engine for (``top_logprobs`` when ``logprobs`` is true), checked as vLLM does."""
        top = self.top_logprobs or 0
        check_logprobs("top_logprobs", top, max_logprobs, vocab_size)
        if top != 0 and not self.logprobs:
            raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        self.check_prompt_logprobs(max_logprobs, vocab_size)
        return top if self.logprobs else None

    def unknown_fields(self) -> list[str]:
        names = super().unknown_fields()
        for m in self.messages:
            names.extend(f"messages[].{name}" for name in (m.model_extra or {}))
        return names


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


# ---- logprobs in responses, shaped as vLLM 0.32's OpenAI server returns them ---------------------------------------
def _ordered(entry: PositionLogprobs) -> dict[int, float]:
    """Token id -> logprob, the position's own token first, then the top alternatives (one entry per id)."""
    out: dict[int, float] = {}
    for token_id, logprob, _ in entry:
        out.setdefault(token_id, logprob)
    return out


def _clamp(logprob: float) -> float:
    return max(logprob, NO_LOGPROB)


def completion_logprobs(tok, token_ids: list[int], entries: list[PositionLogprobs | None], k: int,
                        offset: int = 0) -> tuple[dict[str, Any], int]:
    """``choices[].logprobs`` of /v1/completions: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the token and
    up to ``k`` alternatives, keyed by text) and ``text_offset`` (from ``offset``); also the next offset.
    A position without logprobs (an echoed prompt's first token) has null entries."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        token = tok.token_text(token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(entry[0][1]))
        top_logprobs.append({tok.token_text(i): _clamp(lp) for n, (i, lp) in enumerate(_ordered(entry).items())
                             if k == -1 or n <= k})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}, offset


def chat_logprobs(tok, token_ids: list[int], entries: list[PositionLogprobs], k: int) -> dict[str, Any]:
    """``choices[].logprobs`` of /v1/chat/completions: ``content[{token, logprob, bytes, top_logprobs}]``, with the
    first ``k`` of (the token, then the most likely tokens) as ``top_logprobs``."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = tok.token_text(token_id)
        return {"token": token, "logprob": _clamp(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}

    content = []
    for token_id, entry in zip(token_ids, entries):
        top = [item(i, lp) for n, (i, lp) in enumerate(_ordered(entry).items()) if k == -1 or n < k]
        content.append({**item(token_id, entry[0][1]), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(tok, entries: list[PositionLogprobs | None]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (the first is null) ``{token id: {logprob, rank, decoded_token}}``."""
    out = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranks: dict[int, int] = {}
        for token_id, _, rank in entry:
            ranks.setdefault(token_id, rank)
        out.append({str(i): {"logprob": _clamp(lp), "rank": ranks[i], "decoded_token": tok.token_text(i)}
                    for i, lp in _ordered(entry).items()})
    return out
