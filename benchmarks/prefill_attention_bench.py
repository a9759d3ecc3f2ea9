"""The prefill attention of one layer on a GPU: the engine's Triton paged kernel (tile variants) against SDPA.

Case = a burst step's prompts: ``--seqs`` whole prompts of ``--len`` tokens (fresh), and the same with every
sequence a chunked-prefill continuation (``--len`` new tokens after ``--cached`` cached ones). Shapes of the
Qwen3-30B-A3B-shaped model (32 query heads, 4 KV heads, head_dim 128, bf16, 16-token blocks). Times are CUDA-event
means over ``--reps`` calls. SDPA rows: ``expanded`` = K/V gathered and expanded to the query heads (the engine's
fallback; the expansion is timed, the gather from the cache is not), ``gqa`` = ``enable_gqa=True`` on the same
gathered K/V (fresh case only: plain causal; what the engine does over views of the step's own K/V).

    python benchmarks/prefill_attention_bench.py --seqs 16 --len 512
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from epkit.engine import kernels
from epkit.engine.attention import attend_each


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--cached", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev, dtype, bs = torch.device("cuda"), torch.bfloat16, 16
    H, KVH, D = args.heads, args.kv_heads, args.head_dim
    for cached in (0, args.cached):
        ctx = cached + args.len
        per_seq_blocks = -(-ctx // bs)
        blocks = torch.randperm(args.seqs * per_seq_blocks).view(args.seqs, per_seq_blocks)
        k_cache = torch.randn(args.seqs * per_seq_blocks * bs, KVH, D, device=dev, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        T = args.seqs * args.len
        q = torch.randn(T, H, D, device=dev, dtype=dtype)
        slots = [(blocks[s].unsqueeze(1) * bs + torch.arange(bs)).flatten()[:ctx].to(dev) for s in range(args.seqs)]
        seqs = [(s * args.len, args.len, slots[s]) for s in range(args.seqs)]
        tables = blocks.to(dev)
        starts = torch.arange(args.seqs, device=dev) * args.len
        news = torch.full((args.seqs,), args.len, device=dev)
        ctxs = torch.full((args.seqs,), ctx, device=dev)
        programs = kernels.prefill_programs([args.len] * args.seqs, kernels.prefill_block_tokens(H, KVH), dev)
        want = torch.zeros_like(q)
        attend_each(q, k_cache, v_cache, want, seqs)
        flops = 4 * args.seqs * H * D * args.len * (cached + args.len / 2)  # causal part of the new tokens
        print(f"\n{args.seqs} sequences x {args.len} new tokens after {cached} cached ({T} rows), "
              f"{flops / 1e9:.1f} GFLOP")
        print("| variant | ms | TFLOP/s | max err |\n|---|---|---|---|")
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    out = torch.zeros_like(q)

                    def run(out=out, block_n=block_n, warps=warps, stages=stages):
                        kernels.prefill_attention(q, k_cache, v_cache, out, tables, starts, news, ctxs, programs, bs,
                                                  block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        ms = timed(run, args.reps)
                    except Exception as exc:  # e.g. out of shared memory for this tile
                        print(f"| triton BLOCK_N={block_n} warps={warps} stages={stages} | {type(exc).__name__} | | |")
                        continue
                    err = (out.float() - want.float()).abs().max().item()
                    print(f"| triton BLOCK_N={block_n} warps={warps} stages={stages} | {ms:.3f} | "
                          f"{flops / ms / 1e9:.0f} | {err:.3g} |")
        out = torch.zeros_like(q)
        print(f"| SDPA per sequence | {timed(lambda: attend_each(q, k_cache, v_cache, out, seqs), args.reps):.3f} | | |")
        if cached == 0:
            idx = torch.arange(T, device=dev).view(args.seqs, args.len)
            kk = k_cache[torch.stack(slots)].transpose(1, 2)
            vv = v_cache[torch.stack(slots)].transpose(1, 2)
            qq = q[idx].transpose(1, 2)

            def expanded():
                F.scaled_dot_product_attention(qq, kk.repeat_interleave(H // KVH, 1), vv.repeat_interleave(H // KVH, 1),
                                               is_causal=True)

            def gqa():
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            print(f"| SDPA batched, K/V expanded per query head (the copy timed) | {timed(expanded, args.reps):.3f} | | |")
            try:
                print(f"| SDPA batched, enable_gqa (no copy timed) | {timed(gqa, args.reps):.3f} | | |")
            except RuntimeError as exc:
                print(f"| SDPA batched, enable_gqa | {type(exc).__name__}: {str(exc)[:80]} | | |")


if __name__ == "__main__":
    main()
