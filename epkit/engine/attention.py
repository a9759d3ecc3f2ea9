"""Attention over a paged KV cache.

The cache of one layer is ``[num_blocks * block_size, kv_heads, head_dim]``; a sequence's
tokens live at the slots its block table names. This step's K/V go into the cache first (one
Triton launch on GPU). On GPU a step's sequences with several new tokens (prefill, chunked
prefill) run together: a burst of whole prompts of one length in consecutive rows as one causal
``scaled_dot_product_attention`` call over views of the step's q/k/v (GQA inside SDPA, no copies);
any other mix in one launch of the Triton paged prefill kernel of :mod:`epkit.engine.kernels`
(K/V read from the cache through the block tables, a GQA group's heads in one tile); where that
kernel is refused, one masked SDPA call padded to the longest sequence, or one call each.
Single-token decodes run on GPU as one batched call: the Triton paged decode kernel where it
passed its self-check, else a gather of the cached K/V and two masked matmuls. On CPU every
sequence runs alone (one SDPA call each) so that its result does not depend on which other
sequences share the step (the engine's invariance guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """Where this step's tokens go in the cache and which cached tokens each sequence reads.

    Built by :func:`build_meta` and read by every layer. How the multi-token sequences attend
    (:class:`PrefillPlan`) depends on the layers' q and cache (device, dtype, heads): it is made
    once per step by :meth:`planned`, which the model's forward calls before its first layer."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    per_seq: list[tuple[int, int, torch.Tensor]]  # (first row, new tokens, slots of the whole context)
    decode_rows: torch.Tensor | None = None  # [B] rows of batched single-token decodes
    decode_tables: torch.Tensor | None = None  # [B, W] block tables of those rows, padded with 0
    decode_ctx: torch.Tensor | None = None  # [B] tokens each of them attends to (cached + the new one)
    decode_len: int = 0  # columns of the PyTorch path's gathered context (>= every decode_ctx)
    block_size: int = 16
    # a graph step: every row (a decode, or one token of a prompt) is one query over its own decode_tables row and
    # decode_ctx, through the batched decode path (decode_rows would be 0..T-1)
    every_row_as_decode: bool = False
    paged: "PagedPrefill | None" = None  # multi-token sequences attended in one batched call (GPU), as the kernel reads them
    # ... and their host (row, new, slots): what the SDPA fallback is built from where the kernel is refused
    prefill_host: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    plan: "PrefillPlan | None" = None  # how ``paged`` attends this step: set once by ``planned``

    def planned(self, q: torch.Tensor, k_cache: torch.Tensor) -> "PrefillPlan":
        """This step's :class:`PrefillPlan` for layers whose q / K cache look like ``q`` / ``k_cache`` (every layer's
        do); made on the first call (the model's forward asks before its first layer), the same object after."""
        if self.plan is None:
            self.plan = plan_prefill(self, q, k_cache)
        return self.plan

    @property
    def prefill(self) -> "PrefillBatch | None":
        """The SDPA fallback's one padded call, if the plan chose it."""
        return self.plan.batch if self.plan is not None else None

    @property
    def fallback_planned(self) -> bool:
        """Whether the plan refused the Triton prefill kernel for some of ``paged``'s sequences (SDPA serves them)."""
        return self.plan is not None and self.plan.fallback


@dataclass(frozen=True)
class PrefillPlan:
    """How one step's multi-token sequences (``AttentionMeta.paged``) attend in every layer; made before the first.

    ``fresh``: the burst of equal whole prompts (``paged.fresh``) runs as one causal SDPA call over views of q/k/v.
    The other sequences go through the Triton prefill kernel (``programs``: its query blocks) or, where the kernel
    is refused (``fallback``), through SDPA: one padded call (``batch``) or one call each (``each``)."""

    fresh: bool = False
    programs: tuple[torch.Tensor, torch.Tensor] | None = None
    fallback: bool = False
    batch: "PrefillBatch | None" = None
    each: tuple[tuple[int, int, torch.Tensor], ...] = ()


NO_PREFILL = PrefillPlan()


@dataclass
class PagedPrefill:
    """A step's multi-token sequences as the Triton prefill kernel reads them: block tables and row ranges on the device."""

    news: list[int]
    tables: torch.Tensor  # [S, W] block ids (0 where padded)
    starts: torch.Tensor  # [S] row of each sequence's first new token
    new: torch.Tensor  # [S] new tokens
    ctx: torch.Tensor  # [S] cached + new tokens
    # (first row, sequences, tokens each) of the longest run of whole prompts of one length in consecutive rows
    # (a burst of equal prompts): plain causal SDPA over views of the step's q/k/v serves them, no cache read;
    # ``fresh_seqs`` are their indices among the step's multi-token sequences
    fresh: tuple[int, int, int] | None = None
    fresh_seqs: range = range(0)


@dataclass
class PrefillBatch:
    """Several sequences' new tokens padded into one ``[S, heads, Q, d]`` attention call; built once per step."""

    q_index: torch.Tensor  # [S, Q] row of each sequence's i-th new token (0 where padded)
    kv_slots: torch.Tensor | None  # [S, L] cache slots of each sequence's context (0 where padded); None if fresh
    mask: torch.Tensor | None  # [S, 1, Q, L] True where query i may see key j (causal, within the context); None if fresh
    rows: torch.Tensor  # [real tokens] output rows ...
    picks: torch.Tensor  # [real tokens] ... and where each one sits in the flattened [S * Q] result
    # every sequence a whole new prompt of the same length: plain causal attention over the step's own
    # K/V (no cache read, no mask, no padding)
    fresh: bool = False


# Padding every prefill sequence to the longest costs (sequences x longest context) K/V rows per
# head and a (sequences x longest new x longest context) mask: batch only while that stays small
# (a long chunked-prefill continuation beside short prompts attends alone instead).
PREFILL_BATCH_MAX_KV = 65536  # padded context tokens (x heads x head_dim x 2 for K and V)
PREFILL_BATCH_MAX_MASK = 2**26  # padded mask entries


def prefill_batchable(news: list[int], ctxs: list[int]) -> bool:
    return len(news) >= 2 and len(news) * max(ctxs) <= PREFILL_BATCH_MAX_KV and \
        len(news) * max(news) * max(ctxs) <= PREFILL_BATCH_MAX_MASK


def _prefill_batch(seqs: list[tuple[int, int, torch.Tensor]], device: torch.device) -> PrefillBatch:
    """``seqs``: (first row, new tokens, host slots of the whole context) per sequence; the mask is built on ``device``."""
    news = torch.tensor([new for _, new, _ in seqs])
    ctxs = torch.tensor([slots.shape[0] for _, _, slots in seqs])
    width_q, width_kv = int(news.max()), int(ctxs.max())
    if bool((news == ctxs).all()) and int(news.min()) == width_q:  # whole prompts, all of one length
        q_index = torch.stack([torch.arange(row, row + new) for row, new, _ in seqs])
        rows = q_index.reshape(-1).to(device)
        return PrefillBatch(q_index.to(device), None, None, rows, torch.arange(rows.shape[0], device=device), fresh=True)
    q_index = torch.zeros((len(seqs), width_q), dtype=torch.long)
    kv_slots = torch.zeros((len(seqs), width_kv), dtype=torch.long)
    for s, (row, new, slots) in enumerate(seqs):
        q_index[s, :new] = torch.arange(row, row + new)
        kv_slots[s, : slots.shape[0]] = slots
    valid = torch.arange(width_q).unsqueeze(0) < news.unsqueeze(1)
    picks = torch.arange(len(seqs) * width_q).view(len(seqs), width_q)[valid]
    news_d, ctxs_d = news.to(device).view(-1, 1, 1), ctxs.to(device).view(-1, 1, 1)
    i = torch.arange(width_q, device=device).view(1, -1, 1)
    j = torch.arange(width_kv, device=device).view(1, 1, -1)
    real_q = i < news_d
    mask = (j < ctxs_d) & (j <= ctxs_d - news_d + i) & real_q
    mask |= ~real_q & (j == 0)  # padding queries see one key (no all-masked row, no NaN); their output is dropped
    return PrefillBatch(q_index.to(device), kv_slots.to(device), mask.unsqueeze(1), q_index[valid].to(device),
                        picks.to(device))


def build_meta(seqs: list[tuple[int, int, list[int]]], block_size: int, device: torch.device, batch_decode: bool,
               batch_prefill: bool | None = None) -> AttentionMeta:
    """``seqs`` holds (tokens already cached, new tokens, block table) per sequence, in row order.

    ``batch_decode`` / ``batch_prefill`` (default: as ``batch_decode``) attend single-token decodes /
    multi-token sequences in one batched call each (GPU); else every sequence attends alone."""
    batch_prefill = batch_decode if batch_prefill is None else batch_prefill
    prefill_host: list[tuple[int, int, torch.Tensor]] = []
    offsets = torch.arange(block_size)
    slot_mapping: list[torch.Tensor] = []
    per_seq: list[tuple[int, int, torch.Tensor]] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_ctx: list[int] = []
    paged: list[tuple[int, int, int, list[int]]] = []
    row = 0
    for cached, new, table in seqs:
        ctx = cached + new
        if batch_decode and new == 1:
            decode_rows.append(row)
            decode_tables.append(table)
            decode_ctx.append(ctx)
            slot_mapping.append(torch.tensor([table[cached // block_size] * block_size + cached % block_size]))
        else:
            slots = (torch.tensor(table).unsqueeze(1) * block_size + offsets).flatten()[:ctx]
            slot_mapping.append(slots[cached:])
            if batch_prefill:
                prefill_host.append((row, new, slots))
                paged.append((row, new, ctx, table))
            else:
                per_seq.append((row, new, slots.to(device, non_blocking=True)))
        row += new
    mapping = torch.cat(slot_mapping) if slot_mapping else torch.zeros(0, dtype=torch.long)
    meta = AttentionMeta(mapping.to(device), per_seq, block_size=block_size)
    if paged:  # how they attend (kernel or SDPA) is chosen by plan_prefill, once the layers' shapes are known
        width = max(len(table) for *_, table in paged)
        numbers = torch.tensor([(row, new, ctx) for row, new, ctx, _ in paged]).t().contiguous().to(device)
        tables = torch.tensor([table + [0] * (width - len(table)) for *_, table in paged]).to(device)
        meta.paged = PagedPrefill([new for _, new, _, _ in paged], tables, numbers[0], numbers[1], numbers[2])
        runs = _equal_prompt_runs(paged)
        if runs:
            start, count = max(runs, key=lambda run: run[1])
            meta.paged.fresh = (paged[start][0], count, paged[start][1])
            meta.paged.fresh_seqs = range(start, start + count)
        meta.prefill_host = prefill_host
    if decode_rows:
        width = max(len(t) for t in decode_tables)
        meta.decode_rows = torch.tensor(decode_rows).to(device)
        meta.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables]).to(device)
        meta.decode_ctx = torch.tensor(decode_ctx).to(device)
        meta.decode_len = max(decode_ctx)
    return meta


def _equal_prompt_runs(paged: list[tuple[int, int, int, list[int]]]) -> list[tuple[int, int]]:
    """(first index, length) of every run of whole prompts (nothing cached) of one length in consecutive rows."""
    runs: list[tuple[int, int]] = []
    for i, (row, new, ctx, _) in enumerate(paged):
        if new != ctx:
            continue
        if runs and sum(runs[-1]) == i:
            prev_row, prev_new = paged[i - 1][0], paged[i - 1][1]
            if prev_new == new and prev_row + new == row:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                continue
        runs.append((i, 1))
    return runs


def plan_prefill(meta: AttentionMeta, q: torch.Tensor, k_cache: torch.Tensor) -> PrefillPlan:
    """How ``meta.paged`` attends in layers whose q / K cache look like ``q`` / ``k_cache`` (only their device, dtype
    and shape are read): the burst over views where the choice is ``auto``, the rest through the Triton kernel where
    it passed its self-check, else SDPA over the sequences outside the burst (one batched call, or one call each)."""
    p = meta.paged
    if p is None:
        return NO_PREFILL
    from epkit.engine import kernels
    from epkit.engine.moe import use_triton

    fresh = p.fresh is not None and use_triton(q) and kernels.prefill_choice() == "auto"
    done = p.fresh_seqs if fresh else range(0)
    if len(done) == len(p.news):
        return PrefillPlan(fresh=fresh)
    if use_triton(q) and kernels.prefill_kernel_enabled(q, k_cache, meta.block_size, attend_each):
        block_tokens = kernels.prefill_block_tokens(q.shape[1], k_cache.shape[1])
        return PrefillPlan(fresh=fresh, programs=kernels.prefill_programs(p.news, block_tokens, p.tables.device, done))
    rest = [seq for i, seq in enumerate(meta.prefill_host) if i not in done]
    if prefill_batchable([new for _, new, _ in rest], [slots.shape[0] for _, _, slots in rest]):
        return PrefillPlan(fresh=fresh, fallback=True, batch=_prefill_batch(rest, q.device))
    # one sequence (its own causal call is as good), or too much padding
    return PrefillPlan(fresh=fresh, fallback=True,
                       each=tuple((row, new, slots.to(q.device, non_blocking=True)) for row, new, slots in rest))


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """This step's K/V into the cache slots: one Triton launch where it passed its check, else two indexed writes."""
    from epkit.engine.moe import use_triton

    if use_triton(k):
        from epkit.engine import kernels

        if kernels.write_kv_enabled(k, k_cache):
            kernels.write_kv(k, v, slots, k_cache, v_cache)
            return
    k_cache[slots] = k
    v_cache[slots] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMeta) -> torch.Tensor:
    """Write this step's K/V into the cache, attend, return ``[T, heads * head_dim]``."""
    write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.every_row_as_decode:  # a graph step: one batched call, no per-sequence work
        out = _batched_decode(q, k_cache, v_cache, meta)
        return out.reshape(q.shape[0], q.shape[1] * q.shape[2])
    out = torch.empty_like(q)
    plan = meta.planned(q, k_cache) if meta.paged is not None else NO_PREFILL
    if plan.fresh:
        _fresh_prefill(q, k, v, out, *meta.paged.fresh)
    if plan.programs is not None:
        from epkit.engine import kernels

        p = meta.paged
        kernels.prefill_attention(q, k_cache, v_cache, out, p.tables, p.starts, p.new, p.ctx, plan.programs,
                                  meta.block_size)
    attend_each(q, k_cache, v_cache, out, meta.per_seq)
    attend_each(q, k_cache, v_cache, out, plan.each)
    if plan.batch is not None:
        out[plan.batch.rows] = _batched_prefill(q, k, v, k_cache, v_cache, plan.batch)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _batched_decode(q[meta.decode_rows], k_cache, v_cache, meta)
    return out.reshape(q.shape[0], q.shape[1] * q.shape[2])


def _fresh_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, first: int, seqs: int,
                   length: int) -> None:
    """``seqs`` whole prompts of ``length`` tokens from row ``first``: one causal SDPA call over views of this step's
    q/k/v (no gather, no copy of K/V per query head: ``enable_gqa``), written into ``out``'s rows."""
    rows = slice(first, first + seqs * length)

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [seqs * length, heads, d] -> [seqs, heads, length, d], a view
        return t[rows].view(seqs, length, t.shape[1], t.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                       enable_gqa=q.shape[1] != k.shape[1])
    out[rows].view(seqs, length, q.shape[1], q.shape[2]).copy_(o.transpose(1, 2))


def attend_each(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                seqs: list[tuple[int, int, torch.Tensor]]) -> None:
    """One SDPA call per sequence (first row, new tokens, slots of its whole context), causal over its new tokens."""
    for start, new, slots in seqs:
        ctx = slots.shape[0]
        qq = q[start : start + new].transpose(0, 1).unsqueeze(0)
        kk = k_cache[slots].transpose(0, 1).unsqueeze(0)
        vv = v_cache[slots].transpose(0, 1).unsqueeze(0)
        mask, causal = None, False
        if new == ctx and new > 1:
            causal = True
        elif new > 1:
            pos = torch.arange(ctx, device=q.device)
            mask = pos.unsqueeze(0) <= (ctx - new + torch.arange(new, device=q.device)).unsqueeze(1)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal, enable_gqa=True)
        out[start : start + new] = o[0].transpose(0, 1)


def _batched_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     p: PrefillBatch) -> torch.Tensor:
    """Every prefill sequence of the step in one SDPA call; returns the real tokens' rows, in ``p.rows`` order."""
    S, width_q = p.q_index.shape
    heads, d = q.shape[1], q.shape[2]
    if p.fresh:  # causal over the step's own K/V, no mask: GQA inside SDPA (flash / cuDNN on an H200: 0.11 ms
        # per layer for 16 x 512 tokens, against 0.31 ms with K/V expanded to the query heads)
        o = F.scaled_dot_product_attention(q[p.q_index].transpose(1, 2), k[p.q_index].transpose(1, 2),
                                           v[p.q_index].transpose(1, 2), is_causal=True,
                                           enable_gqa=heads != k.shape[1])
        return o.transpose(1, 2).reshape(S * width_q, heads, d)
    kv_heads = k_cache.shape[1]
    qq = q[p.q_index].transpose(1, 2)  # [S, heads, Q, d]
    # K/V expanded to the query heads (a copy): the memory-efficient kernel takes any mask without
    # materialising [S, heads, Q, L] scores, which GQA inside SDPA would
    kk = k_cache[p.kv_slots].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vv = v_cache[p.kv_slots].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask)
    return o.transpose(1, 2).reshape(S * width_q, heads, d)[p.picks]


def _batched_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """One query token per sequence: the Triton paged kernel where it is checked, else gather + matmul."""
    from epkit.engine.kernels import decode_kernel_enabled, paged_decode_attention

    if decode_kernel_enabled(q, k_cache, meta.block_size, torch_decode):
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_tables, meta.decode_ctx, meta.block_size)
    return torch_decode(q, k_cache, v_cache, meta.decode_tables, meta.decode_ctx, meta.block_size, meta.decode_len)


def torch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor,
                 block_size: int, length: int | None = None) -> torch.Tensor:
    """GQA decode without expanding K/V: gather each sequence's first ``length`` cached slots, two batched matmuls, masked softmax."""
    B, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    slots = (tables.unsqueeze(2) * block_size + torch.arange(block_size, device=q.device)).reshape(B, -1)
    if length is not None:
        slots = slots[:, :length]
    mask = torch.arange(slots.shape[1], device=q.device).unsqueeze(0) < ctx_lens.unsqueeze(1)
    qg = q.view(B, kv_heads, heads // kv_heads, d)
    k = k_cache[slots].permute(0, 2, 3, 1)  # [B, kv_heads, d, ctx]
    v = v_cache[slots].transpose(1, 2)  # [B, kv_heads, ctx, d]
    scores = torch.matmul(qg, k).float() * d ** -0.5  # [B, kv_heads, group, ctx]
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, heads, d)
