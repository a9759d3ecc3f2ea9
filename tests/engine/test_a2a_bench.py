"""The dispatch + combine microbenchmark on real gloo ranks: bytes counted from the tensors each collective was
handed equal what the shape and the routing imply, combine ∘ dispatch returns every token, both routings run,
bad arguments name the flag. Tiny shapes (2 shared cores); no timing is asserted."""

from __future__ import annotations

import pytest
import torch

from epkit.engine.a2a_bench import BenchConfig, check_backends, expected_bytes, main, make_inputs, run
from epkit.engine.moe import ExpertRanges
from epkit.errors import EngineError

SHAPE = dict(hidden_size=64, top_k=2, num_experts=8)
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CPU_PARTIAL_BYTES = 8  # the engine sums expert outputs in float64 on CPU (epkit.engine.moe.weighted_sum)


def _sends(cfg: BenchConfig, tokens: int) -> list[list[int]]:
    """(token, expert) pairs each rank routes to each rank, recomputed from the inputs (not from the bench)."""
    owner = ExpertRanges(cfg.num_experts, cfg.ranks, 0).owner_table(torch.device("cpu"))
    return [torch.bincount(owner[make_inputs(cfg, r, tokens)[1]].reshape(-1), minlength=cfg.ranks).tolist()
            for r in range(cfg.ranks)]


def _check_rows(cfg: BenchConfig, rows: list[dict]) -> None:
    assert [(r["backend"], r["tokens_per_rank"]) for r in rows] == [(b, t) for b in cfg.backends for t in cfg.tokens]
    for row in rows:
        tokens, name = row["tokens_per_rank"], row["backend"]
        assert row["identity_ok"], row
        sends = _sends(cfg, tokens)
        assert row["send_pairs"] == sends
        for rank in range(cfg.ranks):
            alg, bus = expected_bytes(name, rank, tokens, cfg.hidden_size, cfg.top_k, BYTES[cfg.dtype],
                                      CPU_PARTIAL_BYTES, sends)
            assert row["alg_bytes_per_rank"][rank] == alg, (name, tokens, rank)
            assert row["bus_bytes_per_rank"][rank] == pytest.approx(bus), (name, tokens, rank)
        assert row["median_latency_us"] > 0 and row["p99_latency_us"] >= row["median_latency_us"]
        assert row["busbw_gbs"] == pytest.approx(row["bus_bytes"] / row["median_latency_us"] / 1e3)
        assert len(row["latencies_us"]) == cfg.iters and row["device"] == "cpu"


def test_two_ranks_uniform_bf16_bytes_and_identity():
    cfg = BenchConfig(**SHAPE, ranks=2, tokens=(1, 8, 64), routing="uniform", dtype="bfloat16", iters=3, warmup=1)
    rows = run(cfg)
    _check_rows(cfg, rows)
    assert {r["identity_max_abs_err"] for r in rows} == {0.0}  # weights summing to 1 round back to the bf16 token


def test_four_ranks_skewed_float32_bytes_identity_and_imbalance():
    cfg = BenchConfig(**SHAPE, ranks=4, tokens=(1, 32), routing="skewed", zipf_exponent=1.5, dtype="float32",
                      iters=2, warmup=0)
    rows = run(cfg)
    _check_rows(cfg, rows)
    big = [r for r in rows if r["tokens_per_rank"] == 32]
    # Zipf over expert ids under the linear placement: rank 0's experts get the most pairs
    assert all(r["expert_load_imbalance"] > 1.5 for r in big)
    a2a = next(r for r in big if r["backend"] == "all_to_all")
    uniform = BenchConfig(**{**SHAPE}, ranks=4, routing="uniform")
    recv_skewed = [sum(col) for col in zip(*a2a["send_pairs"])]
    recv_uniform = [sum(col) for col in zip(*_sends(uniform, 32))]
    assert recv_skewed[0] > recv_uniform[0] and recv_skewed[0] == max(recv_skewed)


def test_bytes_formula_by_hand():
    # 2 ranks, 4 tokens each, hidden 64 bf16, top-2: packed row = 128 + 16 bytes; partials float64
    sends = [[5, 3], [2, 6]]
    assert expected_bytes("allgather_reducescatter", 0, 4, 64, 2, 2, 8, sends) == (2 * 4 * 144 + 2 * 4 * 64 * 8,
                                                                                   4 * 144 + 4 * 64 * 8)
    assert expected_bytes("naive", 1, 4, 64, 2, 2, 8, sends) == (2 * 4 * 144 + 4096, 2 * 4 * 144 + 4096)
    # rank 0: counts 16 B; sends 8 pairs (3 off-rank) of 128 + 8 B; gets back 7 rows (2 off-rank) of 128 B
    assert expected_bytes("all_to_all", 0, 4, 64, 2, 2, 8, sends) == (16 + 8 * 136 + 7 * 128, 8 + 3 * 136 + 2 * 128)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing="zipf"), r"--routing='zipf'; allowed: uniform, skewed"),
    (dict(dtype="int8"), r"--dtype='int8'; allowed: bfloat16, float16, float32"),
    (dict(dtype="float8_e4m3fn"), r"--dtype='float8_e4m3fn'; allowed: .*; fp8 dispatch is a vendor-kernel feature"),
    (dict(tokens=(1, 0)), r"--tokens='1,0'; allowed: a comma-separated list of integers >= 1"),
    (dict(backends=("nccl",)), r"--backend='nccl'; allowed: allgather_reducescatter, naive, all_to_all, pplx"),
    (dict(ranks=16), r"--ranks=16; allowed: 1..8: every rank needs an expert"),
    (dict(device="tpu"), r"--device='tpu'; allowed: cpu, cuda"),
    (dict(zipf_exponent=-1.0), r"--zipf-exponent=-1.0; allowed: a number >= 0"),
])
def test_bad_arguments_name_flag_value_and_allowed(kwargs, message):
    with pytest.raises(EngineError, match=message):
        BenchConfig(**SHAPE, **kwargs)


def test_vendor_backends_are_refused_naming_their_package(tmp_path, capsys):
    import importlib.util

    for name, module, package in (("deepep_low_latency", "deep_ep", "DeepEP"), ("pplx", "pplx_kernels", "pplx-kernels"),
                                  ("flashinfer_all2allv", "flashinfer", "flashinfer")):
        said = "is importable, but" if importlib.util.find_spec(module) else f"needs the {package} package"
        with pytest.raises(EngineError, match=f"--backend {name}.*{said}"):
            check_backends([name])
    check_backends(["allgather_reducescatter", "naive", "all_to_all"])
    assert main(["--hidden-size", "64", "--top-k", "2", "--num-experts", "8", "--backend", "deepep_high_throughput",
                 "--out", str(tmp_path / "rows.jsonl")]) == 2
    assert "DeepEP" in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()  # refused before anything ran


def test_identity_experts_gpu_paths_give_the_cpu_paths_partial_sums():
    """The paths a GPU takes through the gather-based backends (sync-free sentinel rows; the fused row kernels'
    ``partial``) give the same partial sums with identity experts as the CPU path, run here on the CPU."""
    from epkit.engine.a2a_bench import IdentityExperts
    from epkit.engine.all2all import AllGatherReduceScatter, Communicator

    g = torch.Generator().manual_seed(3)
    placement = ExpertRanges(8, 2, 1)
    experts = IdentityExperts(placement, torch.device("cpu"))
    backend = AllGatherReduceScatter(Communicator(1, 2), torch.device("cpu"))
    counts, capacity, k = [5, 3], 5, 2
    gx = torch.randn(10, 16, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(10)]).float()
    w = torch.rand(10, k, generator=g)
    gmeta = torch.cat([ids, w / w.sum(1, keepdim=True)], 1)
    cpu = backend._local_partial(gx, gmeta, counts, capacity, experts)
    experts.supports_sentinel = lambda x: True
    sentinel = backend._local_partial(gx, gmeta, counts, capacity, experts)
    torch.testing.assert_close(sentinel, cpu)
    local = experts.map.local_index_or(ids.long(), 1, experts.num_local).reshape(-1)
    fused = experts.partial(gx, local, gmeta[:, k:].reshape(-1), k)
    valid = torch.tensor([True] * 5 + [True] * 3 + [False] * 2)  # rank 1 has 3 real rows of 5
    torch.testing.assert_close(fused[valid].double(), cpu[valid].double(), rtol=1e-6, atol=1e-6)
