"""Requests as the engine core sees them: sampling parameters, sequences, outputs (pure data)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # alternatives per sampled token (0: the token's own only; -1: the whole vocabulary)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # disaggregated prefill/decode (vLLM puts them in SamplingParams.extra_args): do_remote_decode on a prefill,
    # do_remote_prefill and where to pull from on a decode; see epkit.engine.kv_transfer
    kv_transfer_params: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name}={value} must be >= 0, or -1 for the whole vocabulary")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    """What the API server sends a DP rank."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)


# One position's log-probabilities: (token id, logprob, rank) of the token at that position (sampled, or the
# prompt's), then the ``k`` most likely tokens in rank order (1, 2, ...); log_softmax of the raw float32 logits,
# before temperature, top-k or top-p (vLLM's default logprobs mode, raw_logprobs).
PositionLogprobs = tuple[tuple[int, float, int], ...]


@dataclass(frozen=True)
class RequestOutput:
    """New tokens of one request after one engine step; ``finish_reason`` set on the last.

    ``logprobs`` holds one :data:`PositionLogprobs` per new token when the request asked for them;
    ``prompt_logprobs`` (once, with the first token) one per prompt token, None for the first."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop", "length", "abort"
    num_prompt_tokens: int = 0
    logprobs: tuple[PositionLogprobs, ...] | None = None
    prompt_logprobs: tuple[PositionLogprobs | None, ...] | None = None
    kv_transfer_params: dict | None = None  # a prefill's, with its last output: where its held KV is
    kv_transfer_stats: dict | None = None  # a decode's, with its first output: how its prompt's KV was pulled
    error: str | None = None  # why the request failed (finish_reason "abort"), for the API's error reply
    # with the first token: prompt tokens found in the prefix cache at admission (vLLM's num_cached_tokens);
    # None where no lookup was made (prefix caching off, prompt logprobs asked, a remote prefill's decode)
    num_cached_tokens: int | None = None


class Status(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"  # blocks allocated, the prompt's KV being pulled from its prefill (vLLM's WAITING_FOR_REMOTE_KVS)
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens and KV bookkeeping inside a DP rank."""

    def __init__(self, request: EngineRequest):
        self.request_id = request.request_id
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # prefix caching (epkit.engine.block_manager): chained hashes of the full blocks hashed so far, how many of
        # block_table's blocks are in the cache, prompt tokens found cached at the first admission (None: no lookup)
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens: int | None = None
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = request.arrival_time
        # prompt logprobs gathered over prefill chunks (index = prompt position); sent with the first token
        self.prompt_logprobs: list[PositionLogprobs | None] | None = [None] if self.params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.kv_transfer_params = self.params.kv_transfer_params
        self.kv_transfer_stats: dict | None = None

    @property
    def remote_prefill(self) -> bool:
        """True until the prompt's KV has been pulled from the prefill named in ``kv_transfer_params``."""
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_prefill"))

    @property
    def remote_decode(self) -> bool:
        """True for a prefill whose blocks are kept for a decode instance once it finishes."""
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_decode"))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.value})"
