"""Continuous batching: which sequences run this step and with how many new tokens.

Running sequences go first (one decode token each, or the rest of a chunked prefill, which leaves
one token of the budget to every running decode behind it); waiting ones are admitted while
``max_num_seqs``, the token budget ``max_num_batched_tokens`` and free KV blocks allow. vLLM 0.32's
``--long-prefill-token-threshold`` caps one prompt's tokens per step while others are queued or
running; older vLLM's ``--max-num-partial-prefills`` / ``--max-long-partial-prefills`` bound how
many sequences (and how many long ones) prefill in one step. When blocks run out, the most
recently admitted sequence is preempted: its blocks are freed and it is recomputed later.
Without chunked prefill (``--no-enable-chunked-prefill``) a prompt is admitted only whole.

Disaggregated prefill/decode (:mod:`epkit.engine.kv_transfer`): a decode request whose prompt was prefilled
elsewhere is admitted with blocks for its whole prompt into ``receiving`` while its KV is pulled; then its
prompt counts as computed except the last token, which it recomputes to sample its first token (vLLM's
rule). A finished prefill whose decode runs elsewhere keeps its blocks in ``holding`` until released.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from epkit.engine.block_manager import BlockManager
from epkit.engine.sequence import EngineRequest, PositionLogprobs, RequestOutput, Sequence, Status
from epkit.errors import EngineError


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_id: int
    chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # vLLM's: a prompt's chunk per step when others are queued or running
    long_prefill_token_threshold_adaptive: bool = False  # vLLM's: the cap floored at the budget's fair share
    max_num_partial_prefills: int | None = None  # older vLLM's (V0): sequences prefilling at once; None: any
    max_long_partial_prefills: int | None = None  # older vLLM's (V0): of those, prompts longer than the threshold

    def __post_init__(self) -> None:
        if self.long_prefill_token_threshold > self.max_model_len:  # the model's length is known only here
            raise EngineError(f"long_prefill_token_threshold={self.long_prefill_token_threshold} cannot be greater "
                              f"than max_model_len={self.max_model_len}")

    @property
    def long_prompt_tokens(self) -> int:
        """Prompt tokens left above which a prefill is long: the threshold, else (V0's default) 4 % of the
        max model length."""
        return self.long_prefill_token_threshold or int(self.max_model_len * 0.04)


class Scheduler:
    """One DP rank's queue of requests; pure bookkeeping, no tensors."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.receiving: dict[str, Sequence] = {}  # decodes whose prompt KV is being pulled
        self.new_receiving: list[Sequence] = []  # admitted to ``receiving`` since the last look
        self.holding: dict[str, Sequence] = {}  # finished prefills whose blocks wait for their decode
        self.on_hold: Callable[[Sequence], dict[str, Any]] | None = None  # -> the kv_transfer_params to return
        self.changes = 0  # bumped by every add, abort, pull result and release: an idle core's "anything new?"

    def add(self, request: EngineRequest) -> Sequence:
        self.changes += 1
        seq = Sequence(request)
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; returns it if it was still queued or running."""
        self.changes += 1
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(seq)
                    seq.status, seq.finish_reason = Status.FINISHED, "abort"
                    return seq
        seq = self.receiving.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return seq

    # ---- disaggregated prefill/decode ----------------------------------------------------
    def receive_done(self, request_id: str, stats: dict[str, Any]) -> None:
        """The prompt's KV is in the blocks: all but the last prompt token count as computed (vLLM recomputes
        that one to sample the first token) and the sequence runs; a later preemption recomputes it locally."""
        self.changes += 1
        seq = self.receiving.pop(request_id)
        seq.kv_transfer_params = {**seq.kv_transfer_params, "do_remote_prefill": False}
        seq.num_computed_tokens = seq.num_prompt_tokens - 1
        seq.kv_transfer_stats, seq.status = stats, Status.RUNNING
        self.running.append(seq)

    def receive_failed(self, request_id: str, error: str) -> RequestOutput:
        """The pull failed: the blocks are freed and the request ends with ``error``."""
        self.changes += 1
        seq = self.receiving.pop(request_id)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return RequestOutput(request_id, (), "abort", seq.num_prompt_tokens, error=error)

    def release_held(self, request_id: str) -> int | None:
        """Free a finished prefill's held blocks; their count, or None if none are held for ``request_id``."""
        self.changes += 1
        seq = self.holding.pop(request_id, None)
        if seq is None:
            return None
        count = len(seq.block_table)
        self.blocks.free(seq)
        return count

    @property
    def held_blocks(self) -> int:
        """Distinct blocks held for remote decodes (held prefills of one shared prefix share its cached blocks)."""
        return len({block for seq in self.holding.values() for block in seq.block_table})

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _prefill_cap(self) -> int:
        """vLLM 0.32's ``--long-prefill-token-threshold`` this step: the most new tokens one sequence's prefill may
        take while other requests are running or queued (0: no cap; with chunked prefill only)."""
        cfg = self.config
        eligible = len(self.running) + len(self.waiting) + len(self.receiving)
        if not cfg.chunked_prefill or cfg.long_prefill_token_threshold <= 0 or eligible <= 1:
            return 0
        if cfg.long_prefill_token_threshold_adaptive:
            return max(cfg.long_prefill_token_threshold, cfg.max_num_batched_tokens // eligible)
        return cfg.long_prefill_token_threshold

    def _prefill_slots_left(self, prefills: list[int]) -> bool:
        """May one more sequence prefill this step under ``max_num_partial_prefills`` (``prefills``: the remaining
        prompt tokens of those already prefilling in it)?"""
        cfg = self.config
        return cfg.max_num_partial_prefills is None or len(prefills) < cfg.max_num_partial_prefills

    def _long_slot_free(self, remaining: int, prefills: list[int]) -> bool:
        """May a sequence with ``remaining`` prompt tokens prefill this step under ``max_long_partial_prefills``?
        A short one always may: that is how short prompts pass a long one waiting for its slot (the flag's
        meaning in vLLM's V0 scheduler)."""
        cfg, long = self.config, self.config.long_prompt_tokens
        return (cfg.max_long_partial_prefills is None or remaining <= long
                or sum(r > long for r in prefills) < cfg.max_long_partial_prefills)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new tokens) pairs, in row order; blocks are allocated for them.

        Decodes go first within the token budget: a running prefill takes at most what the budget holds after
        one token for every running decode behind it, and at most :meth:`_prefill_cap`; so ITL stays bounded
        while long prompts prefill."""
        budget = self.config.max_num_batched_tokens
        cap = self._prefill_cap()
        batch: list[tuple[Sequence, int]] = []
        prefills: list[int] = []  # remaining prompt tokens of the sequences prefilling this step
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            new = remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1:  # a prefill chunk (or a preempted sequence's recompute)
                decodes_behind = sum(s.num_tokens - s.num_computed_tokens == 1 for s in self.running[i + 1:])
                new = min(remaining, cap or remaining, budget - decodes_behind)
                if new <= 0 or not (self._prefill_slots_left(prefills) and self._long_slot_free(remaining, prefills)):
                    i += 1
                    continue
                prefills.append(remaining)
            new = min(new, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed_tokens + new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.blocks.allocate(seq, seq.num_computed_tokens + new)
            batch.append((seq, new))
            budget -= new
            i += 1
        j = 0  # the waiting sequence looked at: past those that wait for a long-prefill slot only
        while (j < len(self.waiting) and budget > 0 and not preempted
               and len(self.running) + len(self.receiving) < self.config.max_num_seqs):
            seq = self.waiting[j]
            if seq.remote_prefill:
                if not self.blocks.can_allocate(seq, seq.num_prompt_tokens):
                    break
                del self.waiting[j]
                self._receive(seq)
                continue
            cached = self.blocks.cached_prefix(seq)  # prefix caching: these blocks' tokens count as computed
            computed = len(cached or ()) * self.blocks.block_size
            remaining = seq.num_tokens - computed
            new = min(remaining, budget, cap or remaining)
            if (new < remaining and not self.config.chunked_prefill) or not self.blocks.can_allocate(
                    seq, computed + new, cached) or not self._prefill_slots_left(prefills):
                break
            if not self._long_slot_free(remaining, prefills):
                j += 1  # it keeps its place; a shorter prompt behind it may go
                continue
            prefills.append(remaining)
            del self.waiting[j]
            self.blocks.allocate(seq, computed + new, cached)
            seq.num_computed_tokens = computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, new))
            budget -= new
        return batch

    def _receive(self, seq: Sequence) -> None:
        self.blocks.allocate(seq, seq.num_prompt_tokens)
        seq.status = Status.RECEIVING
        self.receiving[seq.request_id] = seq
        self.new_receiving.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: list[tuple[Sequence, int]], sampled: dict[str, int],
                    logprobs: dict[str, PositionLogprobs] | None = None,
                    prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] | None = None) -> list[RequestOutput]:
        """Advance the step's sequences, append sampled tokens, finish and free what is done.

        ``logprobs``: the sampled token's, per request that asked; ``prompt_logprobs``: (first position,
        entries) of the prompt positions this step computed (entry ``i`` is for prompt token
        ``first + i + 1``); they are gathered on the sequence and sent once, with its first token."""
        outputs = []
        for seq, new in batch:
            seq.num_computed_tokens += new
            if prompt_logprobs and seq.request_id in prompt_logprobs and seq.prompt_logprobs is not None:
                first, entries = prompt_logprobs[seq.request_id]
                for i, entry in enumerate(entries):
                    if first + i + 1 == len(seq.prompt_logprobs):  # not yet held (a recomputed prompt repeats them)
                        seq.prompt_logprobs.append(entry)
            if seq.request_id not in sampled:
                continue  # a prefill chunk that did not reach the end of the prompt
            token = sampled[seq.request_id]
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            kv_params = None
            if reason is not None:
                seq.status, seq.finish_reason = Status.FINISHED, reason
                self.running.remove(seq)
                kv_params = self._hold_or_free(seq)
            prompt_lp = None
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                prompt_lp, seq.prompt_logprobs_sent = tuple(seq.prompt_logprobs), True
            token_lp = (logprobs[seq.request_id],) if logprobs and seq.request_id in logprobs else None
            stats, seq.kv_transfer_stats = seq.kv_transfer_stats, None
            cached = seq.num_cached_tokens if seq.num_output_tokens == 1 else None  # prefix-cache hits, once
            outputs.append(RequestOutput(seq.request_id, (token,), reason, seq.num_prompt_tokens, token_lp, prompt_lp,
                                         kv_params, stats, num_cached_tokens=cached))
        return outputs

    def _hold_or_free(self, seq: Sequence) -> dict[str, Any] | None:
        """A finished prefill for a remote decode keeps its blocks (its kv_transfer_params returned); else free."""
        if self.on_hold is not None and seq.remote_decode:
            self.blocks.register(seq)  # later prompts may share the held prompt's blocks (prefix caching)
            self.holding[seq.request_id] = seq
            return self.on_hold(seq)
        self.blocks.free(seq)
        return None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if not params.ignore_eos and token == self.config.eos_token_id:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def needs_sampling(self, seq: Sequence, new: int) -> bool:
        return seq.num_computed_tokens + new == seq.num_tokens
