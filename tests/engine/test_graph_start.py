"""The step that start-up CUDA-graph captures run (``StepGraphs.fill_padding`` + the padded forward), on CPU through
the graph emulation: it may write only the scratch block, never a block the block manager hands out, since the
captures run before serving and every size's warm-up forward runs once for real. (The captures themselves, every
size at start and none while serving, are checked on a GPU: tests/engine/test_gpu.py.)"""

from __future__ import annotations

import torch


def test_startup_capture_step_writes_only_the_scratch_block(monkeypatch):
    from epkit.engine.all2all import Communicator
    from epkit.engine.config import EngineConfig
    from epkit.engine.model import model_config_of
    from epkit.engine.runner import ModelRunner

    monkeypatch.setenv("EPKIT_CUDA_GRAPHS", "emulate")
    cfg = EngineConfig(model="epkit-tiny-moe", device="cpu", load_format="dummy", max_model_len=256, max_num_seqs=64,
                       max_num_batched_tokens=256, kv_cache_memory_bytes=8 * 2**20)
    model_config, model_dir = model_config_of(cfg)
    runner = ModelRunner(cfg, model_config, model_dir, 0, torch.device("cpu"), Communicator(0, 1))
    graphs = runner.graphs
    assert graphs is not None and graphs.mode == "emulate"
    assert graphs.graphs == {} and graphs.captures == 0  # emulation captures nothing, at start or later
    torch.manual_seed(0)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.normal_()
        v_cache.normal_()
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    bs = runner.block_size
    scratch = graphs.scratch_block * bs
    sizes = graphs.sizes
    for size in sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]}):
        graphs.fill_padding(size)
        assert int(graphs.dev["valid"][: size].sum()) == 1  # one real row per rank: the MoE exchange carries a row
        out = graphs._forward(size, graphs.max_ctx)
        assert out.shape[0] == size and bool(torch.isfinite(out).all())
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        # every handed-out block is untouched (exact: those bytes are never written), the scratch block was written
        assert torch.equal(k[:scratch], k0[:scratch]) and torch.equal(v[:scratch], v0[:scratch])
        assert not torch.equal(k[scratch : scratch + 1], k0[scratch : scratch + 1])
