"""The routed experts of one MoE layer on a GPU: PyTorch's grouped GEMM path against the engine's Triton GEMMs at
several tiles, for steps of ``--tokens`` tokens.

Shapes of the Qwen3-30B-A3B-shaped model by default (128 experts, top-8, hidden 2048, intermediate 768, bf16).
Router logits are random normal (about uniform load, some experts a few rows more than others), so a step of
``T`` tokens gives each expert about ``T * top_k / E`` rows. Each variant runs the whole expert part of a layer
on the same sorted pairs: gather, gate/up GEMM, SiLU * up, down GEMM (``torch`` = ``LocalExperts._grouped_rows``:
the row gather, ``torch._grouped_mm``, the SiLU kernel, ``torch._grouped_mm``; ``triton`` = two ``moe_gemm``
launches, the gather and SiLU inside them). Times are means of CUDA-graph replays (no launch cost); the max error
is against the ``torch`` path, relative to its largest value.

    python benchmarks/moe_gemm_bench.py --tokens 512,2048,8192
"""

from __future__ import annotations

import argparse
import itertools

import torch

from epkit.engine import kernels
from epkit.engine.kernels.timing import graph_ms
from epkit.engine.moe import LocalExperts


def tiles() -> list[tuple[int, int, int, int, int]]:
    """(block_m, block_n, block_k, num_warps, num_stages) variants: the decode tile and larger ones (8 warps from a
    64x128 tile up: gate and up are two accumulators)."""
    out = [(16, 64, 128, 4, 4)]
    for bm, bn, bk, stages in itertools.product((32, 64, 128), (64, 128), (64, 128), (3, 4)):
        if bm == 128 and bn == 128 and bk == 128:
            continue  # past one SM's shared memory
        out.append((bm, bn, bk, 8 if bm * bn >= 64 * 128 else 4, stages))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--top", type=int, default=8, help="print the fastest this many Triton tiles per size")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    E, k, H, inter = args.experts, args.top_k, args.hidden, args.intermediate
    gen = torch.Generator(device=dev).manual_seed(19)
    w13 = (torch.randn((E, H, 2 * inter), generator=gen, device=dev) * H ** -0.5).to(dtype)
    w2 = (torch.randn((E, inter, H), generator=gen, device=dev) * inter ** -0.5).to(dtype)
    experts = LocalExperts(w13, w2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {E} experts, top-{k}, hidden {H}, "
          f"intermediate {inter}")
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn((T, H), generator=gen, device=dev).to(dtype)
        logits = torch.randn((T, E), generator=gen, device=dev)
        expert_idx = logits.topk(k, dim=-1).indices.flatten().to(torch.int32)
        pos, src, counts = kernels.group_pairs(expert_idx, E, k)
        rows = expert_idx.shape[0]
        flops = 2 * rows * H * 3 * inter
        want = experts._grouped_rows(x, src, counts, rows)
        scale = want.float().abs().max().item()
        results = [("torch._grouped_mm", graph_ms(lambda: experts._grouped_rows(x, src, counts, rows), args.reps), 0.0)]
        for bm, bn, bk, warps, stages in tiles():
            offs, tl_ = kernels.moe_tiles(counts, bm)

            def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, offs=offs, tl_=tl_):
                act = kernels.moe_gemm(x, w13, offs, tl_, bm, rows, src=src, gated=True, block_n=bn, block_k=bk,
                                       num_warps=warps, num_stages=stages)
                return kernels.moe_gemm(act, w2, offs, tl_, bm, rows, block_n=bn, block_k=bk, num_warps=warps,
                                        num_stages=stages)
            name = f"triton m{bm} n{bn} k{bk} w{warps} s{stages}"
            try:
                err = (run().float() - want.float()).abs().max().item() / scale
                results.append((name, graph_ms(run, args.reps), err))
            except Exception as exc:  # e.g. out of shared memory for this tile
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:100]}")
        base = results[0][1]
        counts_h = counts.cpu()
        print(f"\n{T} tokens: {rows} pairs, rows per expert mean {rows / E:.0f} (min {int(counts_h.min())}, "
              f"max {int(counts_h.max())}); {flops / 1e9:.0f} GFLOP")
        print("| variant | ms | TFLOP/s | vs torch | max rel err |\n|---|---:|---:|---:|---:|")
        ranked = [results[0]] + sorted(results[1:], key=lambda r: r[1])[: args.top]
        for name, ms, err in ranked:
            print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {base / ms:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
