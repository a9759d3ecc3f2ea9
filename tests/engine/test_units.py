"""Pure parts of the engine: config checks, scheduler/KV bookkeeping, placement, tokenizer, weights."""

from __future__ import annotations

import pytest
import torch

from epkit.engine.block_manager import BlockManager
from epkit.engine.config import EngineConfig
from epkit.engine.moe import LocalExperts, ExpertRanges
from epkit.engine.scheduler import Scheduler, SchedulerConfig
from epkit.engine.sequence import EngineRequest, SamplingParams, Status
from epkit.errors import EngineError


def test_config_errors_name_field_value_and_allowed():
    with pytest.raises(EngineError, match=r"dtype='int8'.*allowed: auto, float32"):
        EngineConfig(dtype="int8")
    with pytest.raises(EngineError, match=r"data_parallel_size_local=3 must be in 1..data_parallel_size=2"):
        EngineConfig(data_parallel_size=2, data_parallel_size_local=3)
    with pytest.raises(EngineError, match=r"all2all_backend='x'; allowed: allgather_reducescatter, naive, all_to_all, pplx"):
        EngineConfig(all2all_backend="x")
    cfg = EngineConfig(data_parallel_size=4, data_parallel_size_local=2, data_parallel_start_rank=2, headless=True,
                       enable_expert_parallel=True)
    assert cfg.local_dp_ranks == [2, 3] and cfg.ep_size == 4
    assert EngineConfig(data_parallel_size=4).ep_size == 1


def test_placement_covers_every_expert_once_and_is_uneven_when_needed():
    placements = [ExpertRanges(10, 4, r) for r in range(4)]
    assert [len(p.local_experts) for p in placements] == [3, 3, 2, 2]
    assert sorted(e for p in placements for e in p.local_experts) == list(range(10))
    owner = placements[0].owner_table(torch.device("cpu"))
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="ep_size=8"):
        ExpertRanges(4, 8, 0)


def _scheduler(num_blocks: int, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, 256, eos_token_id=2), BlockManager(num_blocks, 4))


def _req(rid: str, n: int, max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(rid, tuple(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_chunked_prefill_then_decode_and_finish():
    s = _scheduler(num_blocks=16, budget=8)
    s.add(_req("a", 10, max_tokens=2))
    batch = s.schedule()
    assert [(q.request_id, n) for q, n in batch] == [("a", 8)]
    assert s.postprocess(batch, {}) == []  # prompt not finished: nothing sampled
    batch = s.schedule()
    assert [(q.request_id, n) for q, n in batch] == [("a", 2)]
    out = s.postprocess(batch, {"a": 7})
    assert out[0].new_token_ids == (7,) and out[0].finish_reason is None
    batch = s.schedule()
    assert [n for _, n in batch] == [1]
    out = s.postprocess(batch, {"a": 8})
    assert out[0].finish_reason == "length" and not s.has_work and s.blocks.num_free_blocks == 16


def test_max_num_seqs_and_token_budget_bound_a_step():
    s = _scheduler(num_blocks=64, max_seqs=2, budget=64)
    for i in range(3):
        s.add(_req(str(i), 5))
    batch = s.schedule()
    assert [q.request_id for q, _ in batch] == ["0", "1"] and len(s.waiting) == 1


def test_preemption_frees_blocks_and_recomputes():
    s = _scheduler(num_blocks=4)  # 16 token slots
    s.add(_req("a", 7, max_tokens=8))
    s.add(_req("b", 7, max_tokens=8))
    for _ in range(3):  # 7-token prompts, one token per step: at 9 tokens each would need 3 of the 4 blocks
        batch = s.schedule()
        s.postprocess(batch, {q.request_id: 1 for q, n in batch if q.num_computed_tokens + n == q.num_tokens})
        if s.num_preemptions:
            break
    assert s.num_preemptions == 1 and [q.request_id for q in s.running] == ["a"]
    b = next(q for q in s.waiting if q.request_id == "b")
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [1, 1]  # its generated tokens are kept and recomputed


def test_abort_returns_blocks():
    s = _scheduler(num_blocks=8)
    s.add(_req("a", 6))
    s.schedule()
    assert s.blocks.num_free_blocks < 8
    assert s.abort("a").finish_reason == "abort" and s.blocks.num_free_blocks == 8 and not s.has_work


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def torch_threads(request):
    """Run the test with torch's intra-op thread count at 1 and at 2 (the engine cores set it from
    EPKIT_CPU_THREADS, default 1), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_expert_rows_are_the_same_in_every_batch(dtype, torch_threads):
    """The property the invariance tests rest on, checked directly: on CPU a row's result from ``linear``, the
    experts and the SwiGLU / gate activations is bit-identical whether it is computed alone or inside a batch of
    1..17 rows, at any position, whatever the other rows hold and whichever experts they use. A BLAS GEMM does not
    give that (rows of ``x @ w`` differed by 3.6e-7 between 3- and 4-row calls on an AVX-512 EPYC; with MKL's AVX2
    kernels the last 2 rows of an 8-row call differ from the first 6); the engine's fixed-point GEMMs are exact, so
    it holds by construction on any CPU and thread count (``epkit.engine.batch_invariant``); run here with 1 and 2
    intra-op threads, since BLAS splits a GEMM differently by thread count."""
    assert torch.get_num_threads() == torch_threads
    from epkit.engine.batch_invariant import gate, silu_mul
    from epkit.engine.model import linear

    g = torch.Generator().manual_seed(0)
    hidden, inter, num_experts = 256, 96, 6  # the tiny model's hidden size; odd intermediate and output sizes
    w = (torch.randn(hidden, 388, generator=g) / hidden**0.5).to(dtype)
    experts = LocalExperts((torch.randn(num_experts, hidden, 2 * inter, generator=g) / hidden**0.5).to(dtype),
                           (torch.randn(num_experts, inter, hidden, generator=g) / inter**0.5).to(dtype))
    row = torch.randn(1, hidden, generator=g).to(dtype)
    alone, alone_expert = linear(row, w), experts(row, torch.tensor([3]))
    alone_act, alone_gate = silu_mul(alone[:, : 2 * inter], inter), gate(alone[:, :1])
    for n in range(1, 18):
        for pos in range(n):
            batch = (3 * torch.randn(n, hidden, generator=g)).to(dtype)
            batch[pos] = row[0]
            idx = torch.randint(0, num_experts, (n,), generator=g)
            idx[pos] = 3
            out = linear(batch, w)
            assert torch.equal(out[pos], alone[0]), (n, pos)
            assert torch.equal(experts(batch, idx)[pos], alone_expert[0]), (n, pos)
            assert torch.equal(silu_mul(out[:, : 2 * inter], inter)[pos], alone_act[0]), (n, pos)
            assert torch.equal(gate(out[:, :1])[pos], alone_gate[0]), (n, pos)

    # ... and the values of the plain products, to rounding. linear: the operands are rounded to 22 significant bits
    # of their row's / column's largest entry (K = 256; 2**-22 = 2 float32 eps) and the exact product once to the
    # dtype (eps / 2), so within 4 eps of |x| @ |w|. Expert: those roundings in both GEMMs plus one each for h, SiLU,
    # the product and the output, through a SiLU of slope <= 1.1: 16 eps of the output's scale (3.6 seen)
    eps = torch.finfo(dtype).eps
    x64, w64 = row.double(), w.double()
    assert ((alone.double() - x64 @ w64).abs() <= 4 * eps * (x64.abs() @ w64.abs())).all()
    w13, w2 = experts.w13[3].double(), experts.w2[3].double()
    h = x64 @ w13
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    scale = (act.abs() @ w2.abs()).max().item()
    torch.testing.assert_close(alone_expert.double(), act @ w2, rtol=0, atol=16 * eps * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_combine_does_not_depend_on_which_rank_adds_which_expert(dtype):
    """The top-k combine on CPU: one rank summing a token's 8 weighted expert outputs gives exactly what 2 or 4 ranks
    give, each summing its own experts, after the partial sums are added (the reduce-scatter / all-reduce of the
    gather backends), in any rank order."""
    from epkit.engine.moe import weighted_sum

    g = torch.Generator().manual_seed(2)
    tokens, k, hidden = 5, 8, 64
    y = torch.randn(tokens * k, hidden, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1).reshape(-1)
    token_idx = torch.arange(tokens * k) // k
    whole = weighted_sum(y, weights, token_idx, tokens)
    for ranks in (2, 4):
        owner = torch.randint(0, ranks, (tokens * k,), generator=g)
        partials = [weighted_sum(y, weights, token_idx, tokens, mask=owner == r) for r in range(ranks)]
        assert torch.equal(sum(partials), whole) and torch.equal(sum(reversed(partials)), whole), ranks
        assert torch.equal(sum(partials).to(dtype), whole.to(dtype))


def test_fixed_point_products_are_exact_in_any_order():
    """What makes the CPU GEMMs batch-invariant: after ``to_fixed`` every product and partial sum is exact in
    float64, so summing the K products one by one in reverse order gives exactly the BLAS result."""
    from epkit.engine.batch_invariant import FixedWeight, fixed_bits, to_fixed

    g = torch.Generator().manual_seed(1)
    for k in (1, 3, 256, 2048):
        x = torch.randn(5, k, generator=g) * torch.logspace(-6, 6, 5).unsqueeze(1)
        w = torch.randn(k, 7, generator=g) / k**0.5
        fw = FixedWeight(w)
        xq = to_fixed(x, fw.bits, -1)
        by_blas = xq @ fw.values
        by_hand = torch.zeros_like(by_blas)
        for i in reversed(range(k)):
            by_hand += xq[:, i : i + 1] * fw.values[i]
        assert torch.equal(by_blas, by_hand), k
        assert 2 * fixed_bits(k) + k.bit_length() <= 53
    assert to_fixed(torch.zeros(2, 4), 22, -1).abs().sum() == 0


def test_weights_depend_on_logical_expert_not_on_rank(tmp_path):
    from epkit.engine.model import ModelConfig, Weights, read_model_config

    config, _ = read_model_config("epkit-tiny-moe")
    mcfg = ModelConfig.from_dict(config)
    whole = Weights(mcfg, ExpertRanges(mcfg.num_experts, 1, 0), 3, torch.device("cpu"), torch.float32)
    half = Weights(mcfg, ExpertRanges(mcfg.num_experts, 2, 1), 3, torch.device("cpu"), torch.float32)
    n = mcfg.num_experts // 2
    assert torch.equal(whole.layers[1]["experts"].w13[n:], half.layers[1]["experts"].w13)
    assert torch.equal(whole.layers[0]["qkv"], half.layers[0]["qkv"])
    other_seed = Weights(mcfg, ExpertRanges(mcfg.num_experts, 1, 0), 4, torch.device("cpu"), torch.float32)
    assert not torch.equal(whole.embed, other_seed.embed)


def test_safetensors_directory_is_loaded(tmp_path):
    from safetensors.torch import save_file

    from epkit.engine.model import ModelConfig, Weights, read_model_config
    from epkit.engine.tokenizer import write_model_dir

    config, _ = read_model_config("epkit-tiny-moe")
    config = {**config, "num_hidden_layers": 1}
    mcfg = ModelConfig.from_dict(config)
    ref = Weights(mcfg, ExpertRanges(mcfg.num_experts, 1, 0), 0, torch.device("cpu"), torch.float32)
    layer, d, h = ref.layers[0], mcfg.head_dim, mcfg.hidden_size
    nq, nkv = mcfg.num_heads * d, mcfg.num_kv_heads * d
    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": ref.embed, "model.norm.weight": ref.norm * 2, "lm_head.weight": ref.lm_head.t(),
        p + "input_layernorm.weight": layer["input_norm"], p + "post_attention_layernorm.weight": layer["post_norm"],
        p + "self_attn.q_proj.weight": layer["qkv"][:, :nq].t(), p + "self_attn.k_proj.weight": layer["qkv"][:, nq:nq + nkv].t(),
        p + "self_attn.v_proj.weight": layer["qkv"][:, nq + nkv:].t(), p + "self_attn.o_proj.weight": layer["o"].t(),
        p + "self_attn.q_norm.weight": layer["q_norm"], p + "self_attn.k_norm.weight": layer["k_norm"],
        p + "mlp.gate.weight": layer["router"].t(),
    }
    inter = mcfg.moe_intermediate_size
    for e in range(mcfg.num_experts):
        w13, w2 = layer["experts"].w13[e], layer["experts"].w2[e]
        tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = w13[:, :inter].t()
        tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = w13[:, inter:].t()
        tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = w2.t()
    write_model_dir(config, tmp_path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    loaded = Weights(mcfg, ExpertRanges(mcfg.num_experts, 2, 1), 99, torch.device("cpu"), torch.float32, tmp_path)
    assert torch.equal(loaded.norm, ref.norm * 2)  # read from the file, not generated
    assert torch.equal(loaded.layers[0]["experts"].w13, layer["experts"].w13[mcfg.num_experts // 2:])
    assert torch.equal(loaded.layers[0]["qkv"], layer["qkv"])


def test_tokenizer_roundtrip_and_incremental_utf8():
    from epkit.engine.model import read_model_config
    from epkit.engine.tokenizer import ByteTokenizer

    config, _ = read_model_config("epkit-tiny-moe")
    tok = ByteTokenizer(config)
    text = "naïve 🙂 <|im_start|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[-1] >= 256
    stream = tok.stream_decoder()
    pieces = [stream.push([i]) for i in tok.encode("🙂")]
    assert pieces[:-1] == ["", "", ""] and pieces[-1] == "🙂"


def test_stop_strings_are_held_back_and_cut():
    from epkit.engine.model import read_model_config
    from epkit.engine.streaming import StopChecker
    from epkit.engine.tokenizer import ByteTokenizer

    config, _ = read_model_config("epkit-tiny-moe")
    tok = ByteTokenizer(config)
    checker = StopChecker(tok, ["END"])
    out = "".join(checker.push((b,), final=False) for b in b"abcEN")
    assert out == "abc"  # "EN" may start the stop string
    out += checker.push((ord("D"),), final=False)
    assert out == "abc" and checker.stopped


def test_import_epkit_does_not_import_torch_or_the_server():
    import subprocess
    import sys

    code = "import epkit, epkit.engine, sys; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_batched_decode_attention_matches_per_sequence_attention():
    """The GPU path (one masked batched call for all single-token decodes) equals the per-sequence path."""
    from epkit.engine.attention import build_meta, paged_attention

    g = torch.Generator().manual_seed(0)
    bs, kv_heads, heads, d = 4, 2, 4, 8
    k_cache, v_cache = torch.randn(256, kv_heads, d, generator=g), torch.randn(256, kv_heads, d, generator=g)
    seqs = [(5, 1, [3, 7]), (9, 1, [1, 2, 9]), (0, 6, [10, 11]), (2, 3, [20, 21])]
    rows = sum(n for _, n, _ in seqs)
    q = torch.randn(rows, heads, d, generator=g)
    k, v = torch.randn(rows, kv_heads, d, generator=g), torch.randn(rows, kv_heads, d, generator=g)
    per_seq = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_meta(seqs, bs, torch.device("cpu"), False))
    batched = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_meta(seqs, bs, torch.device("cpu"), True))
    torch.testing.assert_close(batched, per_seq, rtol=1e-5, atol=1e-5)


def _prefill_case(seqs, seed: int):
    """Random q/k/v for ``seqs`` ((cached, new, block table) each) over random caches; returns the batched
    (GPU-path) meta, its result and the per-sequence result."""
    from epkit.engine.attention import build_meta, paged_attention

    g = torch.Generator().manual_seed(seed)
    bs, kv_heads, heads, d = 4, 2, 8, 16
    k_cache, v_cache = torch.randn(256, kv_heads, d, generator=g), torch.randn(256, kv_heads, d, generator=g)
    rows = sum(n for _, n, _ in seqs)
    q = torch.randn(rows, heads, d, generator=g)
    k, v = torch.randn(rows, kv_heads, d, generator=g), torch.randn(rows, kv_heads, d, generator=g)
    cpu = torch.device("cpu")
    per_seq = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), build_meta(seqs, bs, cpu, False))
    meta = build_meta(seqs, bs, cpu, True, batch_prefill=True)
    return meta, paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta), per_seq


def test_batched_prefill_attention_matches_per_sequence_attention():
    """The GPU path for multi-token sequences (padded into one masked SDPA call) equals one call per sequence:
    whole prompts, chunked-prefill continuations (causal offset into a cached context), mixed with decodes."""
    meta, batched, per_seq = _prefill_case([(0, 7, [3, 7]), (5, 1, [1, 2]), (6, 5, [10, 11, 12]), (0, 2, [20]),
                                            (9, 3, [30, 31, 32])], seed=2)
    assert meta.prefill is not None and meta.prefill.q_index.shape == (4, 7) and not meta.per_seq
    assert not meta.prefill.fresh
    torch.testing.assert_close(batched, per_seq, rtol=1e-5, atol=1e-5)


def test_equal_whole_prompts_attend_causally_over_their_own_kv():
    """A burst of whole prompts of one length (rate inf) takes the unmasked causal call over the step's own K/V;
    it equals one call per sequence, also with a decode in the same step."""
    meta, batched, per_seq = _prefill_case([(0, 6, [3, 7]), (5, 1, [1, 2]), (0, 6, [10, 11]), (0, 6, [20, 21])], seed=3)
    assert meta.prefill is not None and meta.prefill.fresh and meta.prefill.mask is None
    assert meta.prefill.q_index.tolist()[1] == list(range(7, 13))  # the decode's row (6) sits between two prompts
    torch.testing.assert_close(batched, per_seq, rtol=1e-5, atol=1e-5)


def test_a_burst_of_equal_whole_prompts_runs_as_one_sdpa_call_over_views():
    """GPU path for a burst of whole prompts of one length in consecutive rows: causal SDPA over views of the
    step's q/k/v (GQA inside SDPA, nothing gathered or expanded) equals one call per sequence; the longest run of
    such prompts takes that path (a decode between prompts or a chunked continuation ends a run)."""
    from epkit.engine.attention import _fresh_prefill, build_meta

    seqs = [(0, 6, [3, 7]), (0, 6, [10, 11]), (0, 6, [20, 21])]
    cpu = torch.device("cpu")
    assert build_meta(seqs, 4, cpu, True).paged.fresh == (0, 3, 6)
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(256, 2, 16, generator=g), torch.randn(256, 2, 16, generator=g)
    q = torch.randn(18, 8, 16, generator=g)
    qkv_kv = torch.randn(18, 3 * 2, 16, generator=g)  # k and v as strided slices, like the fused QKV output
    k, v = qkv_kv[:, :2], qkv_kv[:, 4:]
    out = torch.zeros_like(q)
    _fresh_prefill(q, k, v, out, 0, 3, 6)
    from epkit.engine.attention import paged_attention

    want = paged_attention(q, k, v, k_cache, v_cache, build_meta(seqs, 4, cpu, False))
    torch.testing.assert_close(out.reshape(18, -1), want, rtol=1e-5, atol=1e-5)
    assert build_meta([(0, 6, [3, 7]), (5, 1, [1, 2]), (0, 6, [10, 11])], 4, cpu, True).paged.fresh == (0, 1, 6)
    assert build_meta([(0, 6, [3, 7]), (2, 6, [10, 11])], 4, cpu, True).paged.fresh == (0, 1, 6)
    assert build_meta([(3, 6, [3, 7, 1]), (0, 6, [10, 11])], 4, cpu, True).paged.fresh == (6, 1, 6)
    assert build_meta([(3, 6, [3, 7, 1]), (5, 1, [8, 9]), (0, 6, [10, 11]), (0, 6, [12, 13])], 4, cpu, True).paged.fresh == (7, 2, 6)


def test_prefill_batches_only_while_the_padding_is_small():
    from epkit.engine.attention import PREFILL_BATCH_MAX_KV, prefill_batchable

    assert prefill_batchable([512] * 16, [512] * 16)  # the benchmark's prefill steps
    assert not prefill_batchable([512], [512])  # one sequence attends alone
    assert not prefill_batchable([100, 8], [PREFILL_BATCH_MAX_KV // 2 + 1, 8])  # a long continuation beside a short prompt
    assert not prefill_batchable([8192, 10], [8192, 10]) and prefill_batchable([100, 10], [8192, 10])  # mask budget


def test_sync_free_sentinel_path_matches_the_gathered_path():
    """The GPU path that pushes every (token, slot) pair through one grouped GEMM, masking pairs routed
    elsewhere, gives the same partial sums as the path that first selects the local pairs."""
    from epkit.engine.all2all import AllGatherReduceScatter, Communicator
    from epkit.engine.moe import StaticExpertMap

    g = torch.Generator().manual_seed(1)
    placement = ExpertRanges(8, 2, 1)
    experts = LocalExperts(torch.randn(4, 16, 24, generator=g), torch.randn(4, 12, 16, generator=g))
    experts.map = StaticExpertMap(placement, torch.device("cpu"))
    backend = AllGatherReduceScatter(Communicator(1, 2), torch.device("cpu"))
    counts, capacity, k = [5, 3], 5, 2
    gx = torch.randn(10, 16, generator=g)
    ids = torch.randint(0, 8, (10, k), generator=g).float()
    gmeta = torch.cat([ids, torch.rand(10, k, generator=g)], 1)
    gathered = backend._local_partial(gx, gmeta, counts, capacity, experts)
    experts.supports_sentinel = lambda x: True  # force the sentinel path (torch._grouped_mm also runs on CPU)
    sentinel = backend._local_partial(gx, gmeta, counts, capacity, experts)
    torch.testing.assert_close(sentinel, gathered, rtol=1e-4, atol=1e-4)
    assert sentinel[8:].abs().sum() == 0  # padded rows of rank 1 (count 3) stay zero


def test_eplb_map_sends_every_expert_to_a_slot_that_holds_it_and_spreads_replicas():
    from epkit.engine.moe import ReplicatedExpertMap
    from epkit.engine.rebalance import resolve_eplb_config
    from epkit.eplb.placement import Placement as SlotPlacement

    phy2log = [[0, 1, 2, 0, 3, 0]]  # 4 experts, 6 slots on 3 ranks (2 each); expert 0 has 3 replicas
    placement = SlotPlacement.from_phy2log(phy2log, 4)
    m = ReplicatedExpertMap(placement.log2phy[0], placement.logcnt[0], 2, torch.device("cpu"))
    ids = torch.tensor([[0, 1], [0, 3], [0, 2], [2, 0]])
    owner, local = m.locate(ids)
    slot = owner * 2 + local
    assert (torch.tensor(phy2log[0])[slot] == ids).all()
    assert len(set(slot[ids == 0].tolist())) == 3  # expert 0's four entries use all three replicas
    for rank in range(3):  # the row kernels' lookup: local slot where this rank serves the entry, else the sentinel
        assert torch.equal(m.local_index_or(ids, rank, 2), torch.where(owner == rank, local, 2))
    with pytest.raises(EngineError, match=r"num_redundant_experts=1: 32 experts \+ 1 = 33 .* EP size 2; valid values: 0, 2"):
        resolve_eplb_config({"num_redundant_experts": 1}, 32, 2)
    with pytest.raises(EngineError, match="policy='best'; allowed: default"):
        resolve_eplb_config({"policy": "best"}, 32, 2)


def test_static_map_local_or_sentinel_matches_locate():
    from epkit.engine.moe import ExpertRanges, StaticExpertMap

    ids = torch.tensor([[0, 9], [4, 5], [10, 3]])
    for rank in range(3):
        placement = ExpertRanges(11, 3, rank)  # 4, 4, 3 experts
        m = StaticExpertMap(placement, torch.device("cpu"))
        owner, local = m.locate(ids)
        mine = len(placement.local_experts)
        assert torch.equal(m.local_index_or(ids, rank, mine), torch.where(owner == rank, local, mine))
        assert torch.equal(m.local_index_or(ids, (rank + 1) % 3, 7), torch.where(owner == (rank + 1) % 3, local, 7))


def test_engine_accepts_exactly_the_eplb_keys_of_topology_and_checks_values():
    from epkit.engine.config import EPLB_KEYS, EngineConfig
    from epkit.eplb.config import EPLB_DEFAULTS
    from epkit.errors import EngineError
    from epkit.topology import EPLBConfig

    assert list(EPLB_KEYS) == EPLBConfig.keys() and set(EPLB_DEFAULTS) == set(EPLB_KEYS)
    full = {"window_size": 4, "step_interval": 8, "num_redundant_experts": 2, "log_balancedness": True,
            "log_balancedness_interval": 2, "use_async": False, "policy": "default", "communicator": "torch_gloo",
            "enable_migration_batching": True}
    EngineConfig(data_parallel_size=2, enable_expert_parallel=True, enable_eplb=True, eplb_config=full)
    for bad, needle in [({"window_size": 0}, "window_size=0"), ({"step_interval": True}, "step_interval=True"),
                        ({"log_balancedness_interval": -1}, "log_balancedness_interval=-1"),
                        ({"communicator": "x"}, "communicator='x'"), ({"wndow_size": 3}, "valid keys")]:
        with pytest.raises(EngineError, match=needle):
            EngineConfig(data_parallel_size=2, enable_expert_parallel=True, enable_eplb=True, eplb_config=bad)


def test_router_skew_biases_routing_toward_low_expert_ids():
    from epkit.engine.moe import route, router_bias

    torch.manual_seed(0)
    logits = torch.randn(4096, 32)
    ids, _ = route(logits, 4, True, router_bias(32, 3.0, torch.device("cpu")))
    counts = torch.bincount(ids.reshape(-1), minlength=32)
    assert counts[:16].sum() > 2 * counts[16:].sum()
    assert router_bias(32, 0.0, torch.device("cpu")) is None


def test_stitched_dump_reads_back_as_a_trace(tmp_path):
    import json

    import numpy as np

    from epkit.engine.eplb_export import stitch_trace, trace_npz
    from epkit.eplb import read_trace

    p2l_a = [[0, 1, 2, 0], [0, 1, 2, 1]]
    p2l_b = [[2, 1, 0, 1], [0, 1, 2, 1]]
    dumps = [{"steps": [3, 4, 5], "load": np.arange(12, dtype=np.float32).reshape(3, 2, 2) + r,
              "maps": [(0, p2l_a), (5, p2l_b)], "num_logical_experts": 3, "config": {}} for r in range(2)]
    doc = stitch_trace(dumps, "m")
    assert [s["step"] for s in doc["steps"]] == [3, 4, 5] and "physical_to_logical" in doc["steps"][2]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    (tmp_path / "t.npz").write_bytes(trace_npz(doc))
    a, b = read_trace(tmp_path / "t.json"), read_trace(tmp_path / "t.npz")
    assert a.load.shape == (3, 2, 3) and np.array_equal(a.load, b.load)
    assert a.load[0, 0].tolist() == [2, 1, 1]


def test_decode_graph_capture_sizes_follow_vllm():
    from epkit.engine.graphs import capture_sizes

    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]
    assert capture_sizes(1024, largest=64)[-1] == 64


def test_mixed_step_capture_sizes_and_which_steps_may_be_graphed():
    """Mixed graph steps: vLLM's decode sizes then every 64 tokens; prompt rows that would read long contexts
    through the paged kernel (a turn after a long prefix) keep their step eager; decode-only graphs as before."""
    from types import SimpleNamespace

    from epkit.engine.graphs import MAX_ROW_CONTEXT, token_sizes
    from epkit.engine.runner import ModelRunner
    from epkit.engine.sequence import Sequence

    assert token_sizes(1024) == [1, 2, 4, *range(8, 257, 8), *range(320, 1025, 64)]
    assert token_sizes(300) == [1, 2, 4, *range(8, 257, 8), 300] and token_sizes(100)[-1] == 100

    def seq(prompt: int, computed: int) -> Sequence:
        s = Sequence(EngineRequest(f"r{prompt}-{computed}", tuple(range(prompt)), SamplingParams(max_tokens=4)))
        s.num_computed_tokens = computed
        return s

    mixed = SimpleNamespace(graphs=SimpleNamespace(mixed=True))
    decode_only = SimpleNamespace(graphs=SimpleNamespace(mixed=False))
    decode = (seq(600, 599), 1)
    prompt = (seq(512, 0), 512)
    long_turn = (seq(31000, 30000), 1000)  # 1,000 new tokens each reading up to 31k cached ones
    assert ModelRunner.step_shape(mixed, [decode, prompt]) == (1, 600)
    assert ModelRunner.step_shape(mixed, [decode, long_turn]) == (0, 31000) and 1000 * 31000 > MAX_ROW_CONTEXT
    assert ModelRunner.step_shape(decode_only, [decode, prompt]) == (0, 600)
    assert ModelRunner.step_shape(decode_only, [decode]) == (1, 600)


def _drawer():
    """A ModelRunner's sampling state without a model: its ``_draw`` needs only generators."""
    from types import SimpleNamespace

    from epkit.engine.runner import ModelRunner

    gen = torch.Generator().manual_seed(7)
    state = SimpleNamespace(device=torch.device("cpu"), _generators={}, _unseeded=gen)
    state._generator = lambda seq: ModelRunner._generator(state, seq)
    return lambda logits, seqs: ModelRunner._draw(state, logits, seqs)


def _seq(rid: str, **params):
    from epkit.engine.sequence import Sequence

    return Sequence(EngineRequest(rid, (1, 2), SamplingParams(max_tokens=4, **params)))


def test_batched_sampling_draws_from_the_filtered_distribution():
    """argmax(p / Exp(1)) is a multinomial draw: frequencies over 20,000 rows match softmax, top-k and top-p."""
    draw = _drawer()
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03]))
    n = 20000
    for params, expected in [({}, [0.4, 0.3, 0.2, 0.07, 0.03]),
                             ({"top_k": 2}, [4 / 7, 3 / 7, 0, 0, 0]),
                             ({"top_p": 0.75}, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0]),  # 0.4 + 0.3 < 0.75: 0.2 is kept
                             ({"temperature": 0.5}, (torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03]) ** 2 / 0.2958).tolist())]:
        seqs = [_seq(f"r{i}", **params) for i in range(n)]
        tokens = draw(logits.expand(n, 5).clone(), seqs)
        freq = torch.bincount(tokens, minlength=5).float() / n
        assert torch.allclose(freq, torch.tensor(expected), atol=0.015), (params, freq)


def test_seeded_rows_do_not_depend_on_their_batch():
    """A request with a ``seed`` samples the same tokens whatever shares its step (the seeded job of the invariance
    tests relies on it). Exact by construction: every operation on a row (temperature, top-k / top-p masks, softmax,
    sort, cumulative sum, the exponential noise drawn from the request's own generator into its own row, argmax)
    reads that row only. Checked with the seeded row at every position of batches of 1..8 rows with other sampling
    settings, over three successive draws."""
    g = torch.Generator().manual_seed(3)
    others = [{}, {"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.5}, {"seed": 5}, {"temperature": 1.3, "top_k": 40, "top_p": 0.8},
              {}, {"top_k": 1}]
    for params in ({"seed": 11, "top_p": 0.9}, {"seed": 12, "temperature": 0.8, "top_k": 50}):
        rows = [3 * torch.randn(1, 384, generator=g) for _ in range(3)]
        draw = _drawer()
        alone = [int(draw(row, [_seq("s", **params)])[0]) for row in rows]
        for n in range(1, 9):
            for pos in range(n):
                draw, got = _drawer(), []
                for row in rows:
                    logits = 3 * torch.randn(n, 384, generator=g)
                    logits[pos] = row[0]
                    seqs = [_seq(f"o{i}", **others[i]) for i in range(n)]
                    seqs[pos] = _seq("s", **params)
                    got.append(int(draw(logits, seqs)[pos]))
                assert got == alone, (params, n, pos)


def test_kernel_choice_variables_are_checked_at_engine_start(monkeypatch):
    """A bad EPKIT_PREFILL_ATTENTION / EPKIT_MOE_GEMM fails when the runner starts, naming the value and the choices."""
    from epkit.engine.kernels import check_environment

    monkeypatch.setenv("EPKIT_PREFILL_ATTENTION", "fast")
    with pytest.raises(ValueError, match=r"EPKIT_PREFILL_ATTENTION='fast': expected auto, triton or torch"):
        check_environment()
    monkeypatch.setenv("EPKIT_PREFILL_ATTENTION", "triton")
    monkeypatch.setenv("EPKIT_MOE_GEMM", "cutlass")
    with pytest.raises(ValueError, match=r"EPKIT_MOE_GEMM='cutlass': expected auto, triton or torch"):
        check_environment()


def test_batch_limits_follow_vllms_device_defaults():
    """Unset --max-num-seqs / --max-num-batched-tokens take vLLM's API-server defaults for the device (what vLLM
    0.26.0 logged on an H100: 8192 batched tokens; its get_batch_defaults: 1024 sequences); given values win."""
    from epkit.engine.config import EngineConfig

    gib = 2**30
    cfg = EngineConfig()
    assert cfg.batch_limits("cuda", 80 * gib, "NVIDIA H100 80GB HBM3", 4096) == (1024, 8192)
    assert cfg.batch_limits("cuda", 141 * gib, "NVIDIA H200", 4096) == (1024, 8192)
    assert cfg.batch_limits("cuda", 80 * gib, "NVIDIA A100-SXM4-80GB", 4096) == (256, 2048)
    assert cfg.batch_limits("cuda", 24 * gib, "NVIDIA L4", 4096) == (256, 2048)
    assert cfg.batch_limits("cpu", 0, "", 4096) == (256, 8192)
    given = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4000)
    assert given.batch_limits("cuda", 80 * gib, "NVIDIA H100 80GB HBM3", 4096) == (64, 4000)
    whole = EngineConfig(enable_chunked_prefill=False)  # a whole prompt must fit one step
    assert whole.batch_limits("cuda", 16 * gib, "Tesla T4", 32768) == (256, 32768)
