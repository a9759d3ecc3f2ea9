"""DP without EP shards every expert tensor-parallel across the DP ranks, as vLLM (issue 19): each rank holds a
1/dp slice of every expert's intermediate dimension, and the MoE output equals DP=1's bit for bit on CPU (exact
fixed-point GEMMs, float64 partials summed before the one rounding: epkit.engine.moe_tp). Real gloo ranks
(subprocesses) on the tiny model; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epkit.engine.model import ModelConfig, Weights, linear, read_model_config
from epkit.engine.moe import ExpertRanges, ReplicatedMoE, route
from epkit.engine.moe_tp import expert_shards
from epkit.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny() -> ModelConfig:
    return ModelConfig.from_dict(read_model_config("epkit-tiny-moe")[0])


def full_weights(dtype: torch.dtype) -> Weights:
    cfg = tiny()
    return Weights(cfg, ExpertRanges(cfg.num_experts, 1, 0), 0, CPU, dtype)


def tokens(rank: int, count: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s MoE inputs (varied magnitudes, so rows' maxima differ between the slices)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    scale = torch.rand(count, 1, generator=gen) * 4 + 0.25
    return (torch.randn(count, hidden, generator=gen) * scale).to(dtype)


def routing(w: Weights, layer: dict, x: torch.Tensor):
    return route(linear(x, layer["router"]), w.cfg.top_k, w.cfg.norm_topk_prob)


# One rank: its weights' slices (layers 0 and last), the MoE output of every MoE layer for its tokens (eager), and
# the same through a padded step (static_valid: the graph steps' fixed mask, garbage in the padding rows).
WORKER = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[6])
from test_dp_tp_moe import tiny, tokens, routing, DTYPES
from epkit.engine.all2all import Communicator
from epkit.engine.model import Weights
from epkit.engine.moe import ExpertRanges
from epkit.engine.moe_tp import expert_shards, make_moe

rank, world, init, out, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], DTYPES[sys.argv[5]]
counts = [int(c) for c in sys.argv[7].split(",")]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
cfg = tiny()
comm = Communicator(rank, world, dist.group.WORLD)
shards = expert_shards(world, False, rank, cfg.moe_intermediate_size)
w = Weights(cfg, ExpertRanges(cfg.num_experts, 1, 0), 0, torch.device("cpu"), dtype, shards=shards)
moe = make_moe(shards, comm, torch.device("cpu"))
x = tokens(rank, counts[rank], cfg.hidden_size, dtype)
size = max(counts) + 2
padded = torch.cat([x, torch.randn(size - x.shape[0], cfg.hidden_size).to(dtype)])
valid = (torch.arange(size)[None, :] < torch.tensor(counts)[:, None]).reshape(-1)
result = {"eager": [], "padded": [], "shapes": []}
moe_layers = [l for l in w.layers if "experts" in l]
with torch.inference_mode():
    for layer in moe_layers:
        e = layer["experts"]
        result["shapes"].append((tuple(e.w13.shape), tuple(e.w2.shape)))
        result["eager"].append(moe(x, *routing(w, layer, x), e, counts))
        moe.static_valid = valid
        result["padded"].append(moe(padded, *routing(w, layer, padded), e, [size] * world)[: x.shape[0]])
        moe.static_valid = None
result["w13"] = [moe_layers[i]["experts"].w13 for i in (0, -1)]
result["w2"] = [moe_layers[i]["experts"].w2 for i in (0, -1)]
torch.save(result, out)
dist.destroy_process_group()
"""


def run_ranks(tmp_path: Path, world: int, dtype: str, counts: list[int]) -> list[dict]:
    """Start ``world`` gloo ranks running ``WORKER``; their results."""
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), str(init), str(tmp_path / f"r{r}.pt"),
                               dtype, str(Path(__file__).parent), ",".join(map(str, counts))], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(tmp_path / f"r{r}.pt") for r in range(world)]


def test_each_rank_holds_a_slice_of_every_expert_and_together_the_dp1_weights(tmp_path):
    results = run_ranks(tmp_path, 2, "float32", [3, 2])
    cfg, full = tiny(), full_weights(torch.float32)
    inter, half = cfg.moe_intermediate_size, cfg.moe_intermediate_size // 2
    for r in results:
        assert r["shapes"] == [((cfg.num_experts, cfg.hidden_size, 2 * half), (cfg.num_experts, half, cfg.hidden_size))] \
            * len(cfg.moe_layers)
    layers = [l for l in full.layers if "experts" in l]
    for j, i in enumerate((0, -1)):
        w13, w2 = layers[i]["experts"].w13, layers[i]["experts"].w2
        gate = torch.cat([r["w13"][j][..., :half] for r in results], -1)
        up = torch.cat([r["w13"][j][..., half:] for r in results], -1)
        assert torch.equal(gate, w13[..., :inter]) and torch.equal(up, w13[..., inter:])
        assert torch.equal(torch.cat([r["w2"][j] for r in results], 1), w2)


@pytest.mark.parametrize("world,dtype,counts", [(2, "float32", [5, 3]), (2, "bfloat16", [4, 6]),
                                                (4, "float32", [3, 0, 5, 1])])
def test_moe_output_equals_dp1_exactly(tmp_path, world, dtype, counts):
    """Every MoE layer's output on each rank is DP=1's for the same tokens, bit for bit; so is a padded step's
    (real rows). At DP=4 a slice is 32 columns wide (not a whole number of vectors: batch_invariant.silu_mul)."""
    results = run_ranks(tmp_path, world, dtype, counts)
    dt = DTYPES[dtype]
    full = full_weights(dt)
    moe = ReplicatedMoE()
    layers = [l for l in full.layers if "experts" in l]
    with torch.inference_mode():
        for rank, r in enumerate(results):
            x = tokens(rank, counts[rank], full.cfg.hidden_size, dt)
            for i, layer in enumerate(layers):
                want = moe(x, *routing(full, layer, x), layer["experts"], [x.shape[0]])
                assert want.dtype == dt and r["eager"][i].dtype == dt
                assert torch.equal(r["eager"][i], want), (rank, i, (r["eager"][i] - want).abs().max())
                assert torch.equal(r["padded"][i], want), (rank, i)


def test_intermediate_not_divisible_by_dp_is_refused():
    with pytest.raises(EngineError, match=r"moe_intermediate_size=96 is not divisible by data_parallel_size=5.*"
                                          r"vLLM needs the same"):
        expert_shards(5, False, 0, 96)
    assert expert_shards(5, True, 0, 96) is None  # EP: whole experts per rank
    assert expert_shards(1, False, 0, 96) is None
    shards = expert_shards(4, False, 3, 96)
    assert (shards.lo, shards.width) == (72, 24)
    assert shards.describe() == ("experts tensor-parallel across 4 DP ranks (intermediate 24 of 96 each), "
                                 "as vLLM without expert parallelism")


PROMPTS = ["The quick brown fox", "Tensor parallel experts", [5, 17, 200, 33, 99, 128, 7]]


def greedy(deployment) -> list[list[int]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: deployment.complete(prompt=p, max_tokens=12, ignore_eos=True), PROMPTS))
    return [r["choices"][0]["token_ids"] for r in results]


def test_dp2_without_ep_greedy_tokens_equal_dp1(deploy):
    dp1 = greedy(deploy([]))
    deployment = deploy(["-dp", "2"])
    assert greedy(deployment) == dp1
    log = deployment.nodes[0].log()
    for rank in (0, 1):
        assert (f"DP rank {rank}: experts tensor-parallel across 2 DP ranks (intermediate 64 of 128 each), "
                "as vLLM without expert parallelism") in log


def test_dp_not_dividing_the_intermediate_size_stops_the_start(deploy):
    with pytest.raises(AssertionError, match=r"moe_intermediate_size=128 is not divisible by data_parallel_size=3"):
        deploy(["-dp", "3"])
