"""The Triton paged decode-attention kernel against the PyTorch computation.

Run by Triton's interpreter (TRITON_INTERPRET=1, on CPU) in a subprocess, since Triton reads
that variable when a kernel is first launched. On a GPU `benchmarks/engine_profile.py` and the
engine's own start-up self-check compare the compiled kernel with the same reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the dev extra installs Triton")

CHECK = r"""
import json, torch
from epkit.engine.attention import torch_decode
from epkit.engine.kernels import decode_kernel_enabled, paged_decode_attention, unsupported_reason
torch.manual_seed(0)
out = []
# (heads, kv_heads, head_dim, block_size, dtype): Qwen3-30B-A3B (32/4/128), the tiny model (4/2/64), MHA, fp16
for heads, kvh, dim, bs, dtype in [(32, 4, 128, 16, torch.float32), (4, 2, 64, 16, torch.float32),
                                   (8, 8, 32, 32, torch.float32), (16, 4, 64, 16, torch.float16)]:
    blocks, B, W = 48, 6, 7
    kc = torch.randn(blocks * bs, kvh, dim).to(dtype)
    vc = torch.randn(blocks * bs, kvh, dim).to(dtype)
    q = torch.randn(B, heads, dim).to(dtype)
    tables = torch.randperm(blocks)[: B * W].view(B, W).clone()
    # contexts: one token, exactly one block, one past a block, a whole table, a tile (64) boundary, mid-block
    ctx = torch.tensor([1, bs, bs + 1, W * bs, 64, 2 * bs + 5])
    got = paged_decode_attention(q, kc, vc, tables, ctx, bs).float()
    want = torch_decode(q, kc, vc, tables, ctx, bs).float()
    # a sequence sees only its own blocks: changing another table's blocks leaves it unchanged
    kc2 = kc.clone(); kc2[tables[0, 1:].repeat_interleave(bs) * bs + torch.arange(bs).repeat(W - 1)] = 1e3
    same = paged_decode_attention(q[:1], kc2, vc, tables[:1], ctx[:1], bs).float()
    # flash-decoding: contexts cut into 2, 3 or 16 tile-aligned parts (the longest spans two tiles: some parts
    # empty) merged by the second kernel; and the default split for 6 sequences on the interpreter's 16 "SMs"
    split_err = max((paged_decode_attention(q, kc, vc, tables, ctx, bs, sp).float() - want).abs().max().item()
                    for sp in (2, 3, 16))
    out.append(dict(case=[heads, kvh, dim, bs, str(dtype)], err=(got - want).abs().max().item(), split_err=split_err,
                    scale=want.abs().max().item(), own_blocks_only=(same - got[:1]).abs().max().item()))
from epkit.engine.kernels.attention import decode_splits
splits = [decode_splits(b, 4, torch.device("cpu")) for b in (1, 3, 4, 8, 16)]
# fused RMSNorm and q/k-norm + RoPE against the PyTorch chains they replace
from epkit.engine import kernels
from epkit.engine.model import rope_cache, torch_norm_rope, torch_rms_norm, ModelConfig
fused = []
for D, dtype in [(256, torch.float32), (2048, torch.float32), (100, torch.float32), (64, torch.float16)]:
    x = (torch.randn(9, 3, D) * 4).to(dtype)[:, 2]  # strided rows
    w = (torch.rand(D) + 0.5).to(dtype)
    fused.append(("rms", D, str(dtype), (kernels.rms_norm(x, w, 1e-6).float() - torch_rms_norm(x, w, 1e-6).float()).abs().max().item()))
for D, dtype, norm in [(128, torch.float32, True), (64, torch.float32, False), (64, torch.float16, True)]:
    qkv = (torch.randn(6, 8 * D) * 3).to(dtype)
    x = qkv[:, 2 * D : 6 * D].reshape(6, 4, D)  # q of a fused QKV row: token stride 8*D, head stride D
    w = (torch.rand(D) + 0.5).to(dtype) if norm else None
    cfg = ModelConfig.from_dict({"model_type": "qwen3_moe", "vocab_size": 300, "hidden_size": 4 * D, "num_hidden_layers": 1,
                                 "num_attention_heads": 4, "head_dim": D, "num_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 8, "rope_theta": 1e6})
    cos, sin = rope_cache(cfg, 4096, torch.device("cpu"))
    pos = torch.tensor([0, 1, 4095, 77, 300, 2])
    got = kernels.norm_rope(x, w, 1e-6, pos, cos, sin).float()
    fused.append(("norm_rope" if norm else "rope", D, str(dtype), (got - torch_norm_rope(x, w, 1e-6, pos, cos, sin).float()).abs().max().item()))
# the fused router: same experts, same weights (Qwen3-30B: 128 experts top-8; the tiny model: 32 top-4 with skew bias)
from epkit.engine.moe import route, router_bias
routes = []
for E, K, norm, skew, dtype in [(128, 8, True, 0.0, torch.float32), (32, 4, True, 3.0, torch.float32),
                                (60, 4, False, 0.0, torch.float16), (64, 6, True, 0.0, torch.float32)]:
    logits = torch.randn(40, E).to(dtype)
    bias = router_bias(E, skew, torch.device("cpu"))
    gi, gw = kernels.route(logits, K, norm, bias)
    wi, ww = route(logits, K, norm, bias)
    routes.append((E, K, torch.equal(gi, wi), (gw - ww).abs().max().item()))
# the MoE row kernels: only this rank's pairs (expert < num_local) are counting-sorted, gathered, computed and combined
from epkit.engine.moe import LocalExperts, weighted_sum
moe_rows = []
for E, R, k in [(4, 10, 3), (8, 33, 8), (1, 5, 2)]:
    x = torch.randn(R, 64)
    experts = LocalExperts(torch.randn(E, 64, 32), torch.randn(E, 16, 64))
    pair_rows = torch.arange(R * k) // k
    expert_idx = torch.randint(0, E + 1, (R * k,))  # E = routed to another rank
    w = torch.rand(R * k)
    got = experts.partial(x, expert_idx, w, k)
    mine = expert_idx < E
    want = weighted_sum(experts(x[pair_rows], torch.where(mine, expert_idx, 0)), w, pair_rows, R, mask=mine)
    moe_rows.append((E, R, k, str(got.dtype), (got - want).abs().max().item()))
# SiLU * up over the first n rows only (float16: the interpreter has no bfloat16 arithmetic)
import torch.nn.functional as F
silu = []
for dtype, inter in [(torch.float32, 96), (torch.float16, 768)]:
    h = (3 * torch.randn(7, 2 * inter)).to(dtype)
    got = kernels.silu_mul(h, torch.tensor([5]))[:5]
    want = (F.silu(h[:5, :inter]) * h[:5, inter:]).float()
    silu.append((str(dtype), inter, (got.float() - want).abs().max().item(), want.abs().max().item(),
                 kernels.silu_mul_enabled(h)))
bad = unsupported_reason(torch.zeros(1, 4, 48), torch.zeros(16, 2, 48))
enabled = decode_kernel_enabled(torch.zeros(1, 4, 64), torch.zeros(16, 2, 64), 16, torch_decode)
print(json.dumps(dict(cases=out, splits=splits, bad=bad, enabled=enabled, fused=fused, routes=routes, moe_rows=moe_rows, silu=silu)))
"""


def test_paged_decode_kernel_matches_pytorch():
    import torch

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for case in result["cases"]:
        tol = 1e-5 if case["case"][-1] == "torch.float32" else 2e-3
        assert case["err"] <= tol * max(1.0, case["scale"]), case
        assert case["split_err"] <= tol * max(1.0, case["scale"]), case  # the same softmax, merged in parts
        # exact by construction: one program per (sequence, KV head), no tiling that depends on the batch, reads
        # only its own sequence's blocks
        assert case["own_blocks_only"] == 0.0, case
    # 4 KV heads on 16 stand-in SMs: about two programs per SM, at most 16 parts, none once the batch fills them
    assert result["splits"] == [8, 4, 1, 1, 1]
    assert result["bad"] == "head_dim=48 is not a power of two >= 16"
    assert result["enabled"] is True  # the start-up self-check passes, so the engine would use it
    for name, dim, dtype, err in result["fused"]:
        # float32: reduction order only; float16: at most one rounding step of the stored value
        assert err <= (2e-5 if dtype == "torch.float32" else 1.6e-2), (name, dim, dtype, err)
    for num_local, rows, k, dtype, err in result["moe_rows"]:
        # exact by construction: both sides run each pair's row through the CPU path's exact expert GEMMs (the same
        # bits whichever rows share the call: epkit.engine.batch_invariant), and the combines sum float32 products
        # in float64, exactly in any order
        assert dtype == "torch.float64" and err == 0.0, (num_local, rows, k, err)
    for dtype, inter, err, scale, enabled in result["silu"]:
        # not the same arithmetic (Triton's exp against ATen's; SiLU rounded to the dtype before the product on both
        # sides): exp may differ by one unit in the last place, which moves SiLU by up to two units of the dtype and
        # the product by one more rounding, so 4 eps of the largest output
        eps = torch.finfo(getattr(torch, dtype.removeprefix("torch."))).eps
        assert enabled and err <= 4 * eps * scale, (dtype, inter, err, scale)
    for experts, k, same_ids, err in result["routes"]:
        assert same_ids and err <= 1e-6, (experts, k, same_ids, err)


def test_without_interpreter_cpu_stays_on_pytorch():
    import torch

    from epkit.engine.kernels import unsupported_reason

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter forced for the whole run")
    assert unsupported_reason(torch.zeros(1, 4, 64), torch.zeros(16, 2, 64)).startswith("device cpu")


MOE_GEMM = r"""
import json, torch
import torch.nn.functional as F
from epkit.engine import kernels

torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.float16):
    E, H, I = 5, 200, 48  # K of 200 leaves a partial last K block, N of 48 and 200 partial column tiles
    w13 = (torch.randn(E, H, 2 * I) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, I, H) / I ** 0.5).to(dtype)
    x = torch.randn(30, H).to(dtype)

    def reference(xx, src, counts):  # per expert: silu(x @ gate) * (x @ up) @ down, rounded as the PyTorch path
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):
            a = xx[src[start:start + c]]
            h = (a.float() @ w13[e].float()).to(dtype)
            act = F.silu(h[:, :I]) * h[:, I:]
            ys.append((act.float() @ w2[e].float()).to(dtype))
            start += c
        return torch.cat(ys)

    # every tile the engine uses (through moe_gemms, as it runs them), a 128-row tile of 8 warps (the large tiles
    # of benchmarks/moe_gemm_bench.py) and 32-row tiles of the default width (moe_gemm alone)
    large = kernels.MoeTile(128, 128, 64, 8, 4, most=float("inf"), timed=512)
    cases = [(tile.block_m, tile) for tile in kernels.MOE_TILES] + [(128, large), (32, None)]
    for block_m, tile in cases:
        counts = torch.tensor([0, 1, block_m, block_m + 3, 2])  # an empty expert, a tile boundary, a partial tile
        total = int(counts.sum())
        src = torch.randint(0, 30, (total,))
        offs, tiles = kernels.moe_tiles(counts, block_m)
        rows = total + 7  # an upper bound, as in a graph step: rows past the pairs stay unwritten
        if tile is None:
            act = kernels.moe_gemm(x, w13, offs, tiles, block_m, rows, src=src, gated=True)
            y = kernels.moe_gemm(act, w2, offs, tiles, block_m, rows)
        else:
            y = kernels.moe_gemms(x, w13, w2, offs, tiles, tile, rows, src)
        want = reference(x, src, counts)
        out.append(dict(dtype=str(dtype), block_m=block_m, shape=list(y.shape), scale=want.abs().max().item(),
                        err=(y[:total].float() - want.float()).abs().max().item(),
                        enabled=tile is None or kernels.moe_gemm_enabled(x, w13, w2, tile, reference)))
bands = [getattr(kernels.moe_tile(r), "block_m", None) for r in (0, 3, 16, 17, 128, 129, 5000)]
print(json.dumps(dict(out=out, bands=bands)))
"""


def test_moe_gemm_kernel_matches_per_expert_matmuls():
    """The Triton expert GEMMs (row gather + gate/up GEMM + SiLU * up, then down GEMM over expert-sorted tiles)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", MOE_GEMM], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["bands"] == [None, 16, 16, None, None, None, None]  # decode-sized groups only
    for case in result["out"]:
        assert case["shape"][1] == 200, case
        # float32: summation order only; float16: one rounding of h, of SiLU * up, and of the output
        tol = 1e-4 if case["dtype"] == "torch.float32" else 1e-2
        assert case["err"] <= tol * max(1.0, case["scale"]), case
        assert case["enabled"] is True, case  # the first-use check passes (no timing off CUDA)


SORT_AND_ADD_NORM = r"""
import json, torch
from epkit.engine import kernels
from epkit.engine.kernels.moe import PAIR_BLOCK, SORT_ONE_PROGRAM_PAIRS
from epkit.engine.model import torch_rms_norm

torch.manual_seed(0)
sorts = []
# a decode step, more pairs than one loop chunk, one expert, and past the one-program limit (the multi-kernel path)
for pairs, num_local, k, block_m in [(24, 128, 8, 16), (2 * PAIR_BLOCK + 37, 12, 4, 16), (9, 1, 3, 1),
                                     (SORT_ONE_PROGRAM_PAIRS + 8, 16, 8, 16)]:
    e = torch.randint(0, num_local + 1, (pairs,))  # num_local: another rank's pair
    pos, src, counts, offs, tiles = kernels.sort_pairs(e, num_local, k, block_m)
    _, _, want = kernels.group_pairs(e, num_local, k)
    want_offs, want_tiles = kernels.moe_tiles(want, block_m)
    own = (e < num_local).nonzero().flatten()
    rows = pos[own].long()
    sorted_e = torch.empty(len(own), dtype=torch.long)
    sorted_e[rows] = e[own]
    sorts.append(dict(pairs=pairs, counts=torch.equal(counts, want) and counts.dtype == torch.long,
                      sums=torch.equal(offs, want_offs) and torch.equal(tiles, want_tiles),
                      rows=sorted(rows.tolist()) == list(range(len(own))),
                      grouped=sorted_e.tolist() == sorted(e[own].tolist()), src=torch.equal(src[rows], own // k)))
adds = []
for D, dtype in [(2048, torch.float32), (100, torch.float16), (64, torch.float32)]:
    x = (torch.randn(7, D) * 3).to(dtype)
    r = (torch.randn(7, 2 * D) * 3).to(dtype)[:, :D]  # strided rows: a slice
    w = (torch.rand(D) + 0.5).to(dtype)
    s, h = kernels.add_rms_norm(x, r, w, 1e-6)
    adds.append(dict(D=D, dtype=str(dtype), sum_exact=torch.equal(s, x + r),
                     err=(h.float() - torch_rms_norm(x + r, w, 1e-6).float()).abs().max().item()))
print(json.dumps(dict(sorts=sorts, adds=adds, sort_ok=kernels.sort_pairs_enabled(torch.zeros(1, dtype=torch.long), 128),
                      add_ok=kernels.add_rms_norm_enabled(torch.zeros(2, 64), torch.zeros(2, 64), torch_rms_norm),
                      rows_ok=kernels.moe_rows_enabled(torch.zeros(2, 64, dtype=torch.float16), torch.float32))))
"""


def test_one_program_pair_sort_and_fused_residual_norm():
    """The MoE pair sort with its tile sums in one program (what a graph step runs: one launch for ~15) against the
    three-kernel sort + PyTorch cumsums, and the residual add + RMSNorm in one launch against PyTorch's."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", SORT_AND_ADD_NORM], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for case in result["sorts"]:  # exact by construction: integer counts and sums, a grouping of the same pairs
        assert all(case[key] for key in ("counts", "sums", "rows", "grouped", "src")), case
    for case in result["adds"]:
        # the sum is PyTorch's add bit for bit (the residual stream the invariance tests compare); the norm is the
        # RMSNorm kernel's arithmetic: float32 reduction order only, float16 one rounding step of the stored value
        assert case["sum_exact"], case
        assert case["err"] <= (2e-5 if case["dtype"] == "torch.float32" else 1.6e-2), case
    # the first-use self-checks pass (the combine written as the model dtype is part of the row kernels' check)
    assert result["sort_ok"] and result["add_ok"] and result["rows_ok"]


PREFILL = r"""
import json, os, torch
from epkit.engine import kernels
from epkit.engine.attention import attend_each, build_meta, paged_attention

torch.manual_seed(0)
out = []
# (heads, kv_heads, head_dim, block_size, dtype): Qwen3-30B-A3B (32/4/128), the tiny model (4/2/64), MHA, fp16
for heads, kvh, dim, bs, dtype in [(32, 4, 128, 16, torch.float32), (4, 2, 64, 16, torch.float32),
                                   (8, 8, 32, 32, torch.float32), (16, 4, 64, 16, torch.float16)]:
    blocks = 40
    kc = torch.randn(blocks * bs, kvh, dim).to(dtype)
    vc = torch.randn(blocks * bs, kvh, dim).to(dtype)
    # (cached, new): whole prompts across query-block and key-tile edges, chunked-prefill continuations, a decode
    spec = [(0, 70), (2 * bs + 3, 9), (0, 1), (bs, bs), (0, 2), (5, 1)]  # (0, 1) and (5, 1): the decode path
    perm = torch.randperm(blocks)
    seqs, used = [], 0
    for cached, new in spec:
        n = -(-(cached + new) // bs)
        seqs.append((cached, new, perm[used:used + n].tolist()))
        used += n
    T = sum(new for _, new in spec)
    q = torch.randn(T, heads, dim).to(dtype)
    k = torch.randn(T, kvh, dim).to(dtype)
    v = torch.randn(T, kvh, dim).to(dtype)
    per_seq = build_meta(seqs, bs, torch.device("cpu"), False)
    want = paged_attention(q, k, v, kc.clone(), vc.clone(), per_seq).float()
    for mode in ("auto", "triton"):  # auto: the leading whole prompt through SDPA over views, the rest the kernel
        os.environ["EPKIT_PREFILL_ATTENTION"] = mode
        meta = build_meta(seqs, bs, torch.device("cpu"), True, batch_prefill=True)
        kc2, vc2 = kc.clone(), vc.clone()
        got = paged_attention(q, k, v, kc2, vc2, meta).float()
        kc3, vc3 = kc.clone(), vc.clone()
        kc3[per_seq.slot_mapping], vc3[per_seq.slot_mapping] = k, v
        out.append(dict(case=[heads, kvh, dim, bs, str(dtype), mode], err=(got - want).abs().max().item(),
                        scale=want.abs().max().item(), kernel=not meta.fallback_planned and meta.prefill is None,
                        fresh=meta.paged.fresh, cache_equal=torch.equal(kc2, kc3) and torch.equal(vc2, vc3)))
odd = kernels.prefill_kernel_enabled(torch.zeros(1, 12, 64), torch.zeros(16, 4, 64), 16, attend_each)
# a burst in the middle of the step (SDPA over views), a continuation and a short prompt around it (the kernel, or
# with a GQA group of 3 heads, refused, the SDPA fallback); the meta is reused as by a second layer
os.environ["EPKIT_PREFILL_ATTENTION"] = "auto"
middle = []
for heads, kvh in [(32, 4), (12, 4)]:
    bs, dim = 16, 64
    kc, vc = torch.randn(40 * bs, kvh, dim), torch.randn(40 * bs, kvh, dim)
    seqs = [(bs, 5, [0, 1]), (0, 6, [2]), (0, 6, [3]), (0, 6, [4]), (0, 3, [5]), (7, 1, [6])]
    T = sum(new for _, new, _ in seqs)
    q, k, v = torch.randn(T, heads, dim), torch.randn(T, kvh, dim), torch.randn(T, kvh, dim)
    want = paged_attention(q, k, v, kc.clone(), vc.clone(), build_meta(seqs, bs, torch.device("cpu"), False)).float()
    meta = build_meta(seqs, bs, torch.device("cpu"), True)
    errs = [(paged_attention(q, k, v, kc.clone(), vc.clone(), meta).float() - want).abs().max().item() for _ in range(2)]
    middle.append(dict(heads=heads, errs=errs, fresh=meta.paged.fresh, seqs=list(meta.paged.fresh_seqs),
                       fallback=meta.fallback_planned))
progs = [[t.tolist() for t in kernels.prefill_programs([5, 16, 17], 8, torch.device("cpu"), skip)]
         for skip in (range(0), range(1, 2))]
print(json.dumps(dict(out=out, odd=odd, programs=progs, middle=middle)))
"""


def test_prefill_attention_kernel_matches_per_sequence_sdpa():
    """The Triton prefill kernel (paged K/V, GQA groups in one tile, causal offset for chunked prefill) and the
    one-launch K/V cache write, through ``paged_attention``, against one SDPA call per sequence."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", PREFILL], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for case in result["out"]:
        assert case["kernel"] and case["cache_equal"], case  # the kernel served the step (no fallback)
        assert case["fresh"] == [0, 1, 70], case  # the leading whole prompt; a decode row follows it
        tol = 1e-5 if case["case"][4] == "torch.float32" else 2e-3
        assert case["err"] <= tol * max(1.0, case["scale"]), case
    assert result["odd"] is False  # a GQA group of 3 heads: refused, the engine stays on SDPA
    assert result["programs"] == [[[0, 1, 1, 2, 2, 2], [0, 0, 8, 0, 8, 16]], [[0, 2, 2, 2], [0, 0, 8, 16]]]
    for case in result["middle"]:  # the burst (rows 5..22) is found in the middle, each sequence attended once
        assert case["fresh"] == [5, 3, 6] and case["seqs"] == [1, 2, 3], case
        assert case["fallback"] is (case["heads"] == 12), case
        assert max(case["errs"]) <= 1e-5, case


def test_a_kernel_verdict_is_kept_per_key_until_forgotten(monkeypatch):
    """``kernel_serves`` runs a kernel's check once per key and keeps the verdict; ``forget_verdicts`` (the A/B runs of
    ``benchmarks/engine_profile.py``, after they change an ``EPKIT_*`` choice) makes the next use check again."""
    import torch

    from epkit.engine.kernels import registry

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a device the kernels run on, for kernel_serves
    saved = dict(registry.verdicts)
    key, x, runs = ("test-kernel", "cpu"), torch.zeros(1), []
    try:
        assert registry.kernel_serves("test kernel", key, x, lambda: runs.append("first")) is True  # None: passed
        assert registry.kernel_serves("test kernel", key, x, lambda: runs.append("again") or "refused") is True
        assert runs == ["first"]
        registry.forget_verdicts()
        assert registry.kernel_serves("test kernel", key, x, lambda: "refused") is False
    finally:
        registry.verdicts.clear()
        registry.verdicts.update(saved)
