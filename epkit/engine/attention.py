"""Attention over a paged KV cache with ``scaled_dot_product_attention``.

The cache of one layer is ``[num_blocks * block_size, kv_heads, head_dim]``; a sequence's
tokens live at the slots its block table names. Sequences with several new tokens
(prefill, chunked prefill) run one fused SDPA call each; on GPU, single-token decodes run
as one batched, masked SDPA call. On CPU every sequence runs alone so that its result does
not depend on which other sequences share the step (the engine's invariance guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """Where this step's tokens go in the cache and which cached tokens each sequence reads."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    per_seq: list[tuple[int, int, torch.Tensor]]  # (first row, new tokens, slots of the whole context)
    decode_rows: torch.Tensor | None = None  # [B] rows of batched single-token decodes
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] slots, padded with 0
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] True where a slot is real


def build_meta(seqs: list[tuple[int, int, list[int]]], block_size: int, device: torch.device, batch_decode: bool) -> AttentionMeta:
    """``seqs`` holds (tokens already cached, new tokens, block table) per sequence, in row order."""
    slot_mapping: list[int] = []
    per_seq: list[tuple[int, int, torch.Tensor]] = []
    decode_rows: list[int] = []
    decode_ctx: list[list[int]] = []
    row = 0
    for cached, new, table in seqs:
        ctx = cached + new
        slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        slot_mapping.extend(slots[cached:])
        if batch_decode and new == 1:
            decode_rows.append(row)
            decode_ctx.append(slots)
        else:
            per_seq.append((row, new, torch.tensor(slots, dtype=torch.long, device=device)))
        row += new
    meta = AttentionMeta(torch.tensor(slot_mapping, dtype=torch.long, device=device), per_seq)
    if decode_rows:
        width = max(len(s) for s in decode_ctx)
        padded = torch.zeros((len(decode_ctx), width), dtype=torch.long)
        mask = torch.zeros((len(decode_ctx), width), dtype=torch.bool)
        for i, s in enumerate(decode_ctx):
            padded[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        meta.decode_slots = padded.to(device)
        meta.decode_mask = mask.view(len(decode_ctx), 1, 1, width).to(device)
    return meta


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMeta) -> torch.Tensor:
    """Write this step's K/V into the cache, attend, return ``[T, heads * head_dim]``."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    for start, new, slots in meta.per_seq:
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
    if meta.decode_rows is not None:
        qq = q[meta.decode_rows].unsqueeze(2)
        kk = k_cache[meta.decode_slots].transpose(1, 2)
        vv = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask, enable_gqa=True)
        out[meta.decode_rows] = o.squeeze(2)
    return out.reshape(q.shape[0], q.shape[1] * q.shape[2])
