"""The model runner of one DP rank: owns the device, the weights, the KV cache and sampling."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from epkit.engine.all2all import Communicator, make_backend
from epkit.engine.attention import build_meta
from epkit.engine.config import EngineConfig
from epkit.engine.graphs import MAX_ROW_CONTEXT, DecodeGraphs, graph_mode
from epkit.engine.model import ModelConfig, MoEModel, Weights
from epkit.engine.moe import Placement, ReplicatedMoE, StaticExpertMap
from epkit.engine.rebalance import Rebalancer, resolve_eplb_config
from epkit.engine.sequence import Sequence
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
CPU_KV_DEFAULT_BYTES = 512 * 2**20
GPU_ACTIVATION_RESERVE_BYTES = 6 * 2**30


def resolve_device(cfg: EngineConfig, local_index: int) -> torch.device:
    """``cuda:<local index>`` when CUDA is wanted and present, else ``cpu``."""
    want = cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise EngineError("device='cuda' but torch.cuda.is_available() is False on this machine")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if local_index >= torch.cuda.device_count():
            raise EngineError(f"DP rank needs GPU {local_index}, this node has {torch.cuda.device_count()}; "
                              "lower --data-parallel-size-local")
        return torch.device("cuda", local_index)
    return torch.device("cpu")


def resolve_dtype(cfg: EngineConfig, model_config: dict, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (exact, fast enough) and the checkpoint dtype on GPU."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(str(model_config.get("torch_dtype") or "bfloat16"), torch.bfloat16)


class ModelRunner:
    """Builds this rank's share of the model and runs one step for a scheduled batch."""

    def __init__(self, cfg: EngineConfig, model_config: dict, model_dir: Path | None, dp_rank: int,
                 device: torch.device, comm: Communicator):
        self.cfg, self.device, self.comm = cfg, device, comm
        from epkit.engine import kernels

        try:
            kernels.check_environment()
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        self.mcfg = ModelConfig.from_dict(model_config)
        self.dtype = resolve_dtype(cfg, model_config, device)
        self.max_model_len = cfg.max_model_len or self.mcfg.max_position_embeddings
        ep = cfg.ep_size
        self.placement = Placement(self.mcfg.num_experts, ep, dp_rank if ep > 1 else 0)
        self.rebalancer: Rebalancer | None = None
        if cfg.enable_eplb:
            eplb = resolve_eplb_config(cfg.eplb_config, self.mcfg.num_experts, ep)
            num_nodes = max(1, cfg.data_parallel_size // cfg.dp_size_local)
            self.rebalancer = Rebalancer(eplb, len(self.mcfg.moe_layers), self.mcfg.num_experts, ep, dp_rank, num_nodes,
                                         device, comm.all_reduce, comm.all_gather, cfg.model_name)
        load_dummy = cfg.load_format == "dummy"
        experts_of_layer = self.rebalancer.local_experts if self.rebalancer else None
        weights = Weights(self.mcfg, self.placement, cfg.seed, device, self.dtype, None if load_dummy else model_dir,
                          experts_of_layer)
        static_map = StaticExpertMap(self.placement, device)
        for layer in weights.layers:
            if "experts" in layer:
                if self.rebalancer:
                    self.rebalancer.attach(layer["experts"], layer["moe_pos"])
                else:
                    layer["experts"].map = static_map
        moe = ReplicatedMoE() if ep == 1 else make_backend(cfg.all2all_backend, comm, device)
        self.model = MoEModel(self.mcfg, weights, moe, self.max_model_len, device)
        if self.rebalancer is not None:
            self.model.record_routing = self.rebalancer.record
        self.block_size = cfg.block_size
        self.num_blocks = self._num_blocks()
        slots = (self.num_blocks + 1) * self.block_size  # + one scratch block for the padding rows of decode graphs
        shape = (slots, self.mcfg.num_kv_heads, self.mcfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=device), torch.zeros(shape, dtype=self.dtype, device=device))
                          for _ in range(self.mcfg.num_layers)]
        self._generators: dict[str, torch.Generator] = {}  # per request with a seed
        self._unseeded = torch.Generator(device=device)
        self._unseeded.seed()
        mode, why = graph_mode(self)
        # all ranks or none: a rank without graphs would run eager steps whose collectives the others do not
        if not all(on for on, in comm.exchange_step_info([int(mode != "off")])) and mode != "off":
            mode, why = "off", "another DP rank cannot use CUDA graphs (see its log); every step runs eager on all ranks"
        self.graphs = DecodeGraphs(self, mode) if mode != "off" else None
        log.info("DP rank %d: graph steps: %s%s", dp_rank, why,
                 f" ({'mixed prefill + decode' if self.graphs.mixed else 'all-decode'} steps of "
                 f"{self.graphs.sizes[0]}..{self.graphs.sizes[-1]} rows, context buckets of "
                 f"{self.graphs.ctx_step} up to {self.graphs.max_ctx})" if self.graphs else "")
        held = (f"{self.rebalancer.slots_per_rank} expert slots of {self.rebalancer.num_physical} (EPLB)" if self.rebalancer
                else f"experts {self.placement.local_experts[0]}..{self.placement.local_experts[-1]} of {self.mcfg.num_experts}")
        log.info("DP rank %d: %s %s, %s (ep=%d, %s), KV cache %d blocks x %d tokens", dp_rank, device,
                 str(self.dtype).replace("torch.", ""), held, ep, getattr(moe, "name", "?"), self.num_blocks, self.block_size)

    def _num_blocks(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        block_bytes = self.mcfg.kv_bytes_per_token(elem) * self.block_size
        if self.cfg.kv_cache_memory_bytes is not None:
            budget = self.cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.cfg.gpu_memory_utilization) - (total - free) - GPU_ACTIVATION_RESERVE_BYTES
        else:
            budget = CPU_KV_DEFAULT_BYTES
        num_blocks = budget // block_bytes - 1  # one block of the budget is the decode graphs' scratch block
        needed = -(-self.max_model_len // self.block_size)
        if num_blocks < needed:
            raise EngineError(
                f"KV cache budget of {max(budget, 0) / 2**20:.1f} MiB holds {max(num_blocks, 0)} blocks of {self.block_size} "
                f"tokens, fewer than one sequence of max_model_len={self.max_model_len} needs ({needed}); raise "
                "--kv-cache-memory-bytes / --gpu-memory-utilization or lower --max-model-len"
            )
        return int(num_blocks)

    # ---- one step ---------------------------------------------------------------------
    def step_shape(self, batch: list[tuple[Sequence, int]]) -> tuple[int, int]:
        """(1 if this rank's rows may run in a graph step, else 0; longest context) of this rank's batch.

        With mixed graph steps a batch may unless its multi-token rows read too much context through the
        paged kernel (``MAX_ROW_CONTEXT``; the token count, exchanged anyway, decides the rest); with
        decode-only graphs only a batch whose rows are all sampled single-token decodes."""
        if self.graphs is not None and self.graphs.mixed:
            reads = sum(new * (seq.num_computed_tokens + new) for seq, new in batch if new > 1)
            graphable = reads <= MAX_ROW_CONTEXT
        else:
            graphable = all(new == 1 and seq.num_computed_tokens + 1 == seq.num_tokens for seq, new in batch)
        return int(graphable), max((seq.num_computed_tokens + new for seq, new in batch), default=0)

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], counts: list[int],
                shapes: list[tuple[int, int]] | None = None) -> dict[str, int]:
        """Run the forward pass for ``batch`` (possibly empty: a dummy step) and sample.

        Returns request id -> sampled token for the sequences whose prompt is now fully
        computed. ``counts`` is every DP rank's token count this step (for the MoE exchange),
        ``shapes`` every rank's :meth:`step_shape`; when every rank's rows may, the step runs
        through a CUDA graph (see :mod:`epkit.engine.graphs`).
        """
        started = time.perf_counter()
        key = None
        if self.graphs is not None and shapes is not None and all(graphable for graphable, _ in shapes):
            key = self.graphs.plan(counts, max(ctx for _, ctx in shapes))
        if key is not None:
            hidden = self.graphs.run(batch, counts, key)
        else:
            ids: list[int] = []
            positions: list[int] = []
            seqs_meta = []
            for seq, new in batch:
                start = seq.num_computed_tokens
                ids.extend(seq.token_ids[start : start + new])
                positions.extend(range(start, start + new))
                seqs_meta.append((start, new, seq.block_table))
            dev = self.device
            meta = build_meta(seqs_meta, self.block_size, dev, batch_decode=dev.type == "cuda")
            hidden = self.model.forward(torch.tensor(ids, dtype=torch.long, device=dev),
                                        torch.tensor(positions, dtype=torch.long, device=dev), meta, self.kv_caches, counts)
        rows, seqs, row = [], [], 0  # the last new token of every sequence whose prompt is now complete samples
        for seq, new in batch:
            row += new
            if seq.num_computed_tokens + new == seq.num_tokens:
                rows.append(row - 1)
                seqs.append(seq)
        sampled: dict[str, int] = {}
        if seqs:
            if len(rows) < hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, device=self.device)]
            sampled = dict(zip((s.request_id for s in seqs), self._sample(self.model.logits(hidden), seqs)))
        self._end_step(started, bool(seqs))
        return sampled

    def _end_step(self, started: float, sampled: bool) -> None:
        if self.rebalancer is not None:  # after sampling: the step time includes the GPU's work (tolist syncs)
            self.rebalancer.end_step(self.model.w.layers, self.model.w.build_experts,
                                     time.perf_counter() - started if sampled else None)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row: argmax for greedy rows, a batched draw for the others; one host sync in all."""
        tokens = torch.argmax(logits, dim=-1)
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._draw(logits[index], [seqs[i] for i in rows])
        return tokens.tolist()

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k, top-p per row, then one sample per row without a host sync.

        The sample is ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn per token, which picks token
        ``i`` with probability ``p_i / sum(p)`` - a multinomial draw, batched. Rows without a
        ``seed`` share one draw from the runner's generator; a request with a ``seed`` draws its
        noise from its own seeded generator, so its tokens depend only on its logits and its
        seed, not on the rest of the batch (the invariance tests rely on it)."""
        dev, params = logits.device, [seq.params for seq in seqs]
        scaled = logits / torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype).unsqueeze(1)
        vocab = scaled.shape[-1]
        if any(p.top_k > 0 for p in params):
            ks = [min(p.top_k, vocab) if p.top_k > 0 else 1 for p in params]
            top = torch.topk(scaled, max(ks), dim=-1).values
            kth = top.gather(1, torch.tensor(ks, device=dev).unsqueeze(1) - 1)
            kth = torch.where(torch.tensor([p.top_k > 0 for p in params], device=dev).unsqueeze(1), kth,
                              torch.full_like(kth, float("-inf")))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            cut = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev).unsqueeze(1)
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            sorted_probs = sorted_probs * (torch.cumsum(sorted_probs, -1) - sorted_probs < cut)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        noise = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=self._unseeded)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[i].exponential_(generator=self._generator(seq))
        return (probs.float() / noise).argmax(dim=-1)

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
