"""The model runner of one DP rank: owns the device, the weights, the KV cache and sampling."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from epkit.engine.all2all import Communicator, make_backend
from epkit.engine.attention import AttentionMeta, build_meta
from epkit.engine.config import EngineConfig, env_value
from epkit.engine.graphs import MAX_ROW_CONTEXT, StepGraphs, graph_mode
from epkit.engine.model import ModelConfig, MoEModel, Weights
from epkit.engine.moe import ExpertRanges, ReplicatedMoE, StaticExpertMap
from epkit.engine.moe_tp import expert_shards, make_moe
from epkit.engine.profile import (GPU_ACTIVATION_RESERVE_BYTES, KV_MARGIN_BYTES, StepProfile, graph_reserve, kv_blocks,
                                  kv_budget, profile_step)
from epkit.engine.rebalance import Rebalancer, resolve_eplb_config
from epkit.engine.sequence import PositionLogprobs, Sequence
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
CPU_KV_DEFAULT_BYTES = 512 * 2**20
SAMPLE_CHUNK_ROWS = 256  # rows drawn together (temperature / top-k / top-p over the whole vocabulary)


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


OWN_MODEL_PREFIX = "epkit-"  # epkit's own bundled models: their weights are the seed's, no checkpoint exists


def weight_source(cfg: EngineConfig, model_dir: Path | None) -> tuple[Path | None, str]:
    """(the directory whose ``*.safetensors`` are read, or None for random weights; a line saying which, for the log).

    ``--load-format dummy`` is random weights from ``--seed``. ``auto`` / ``safetensors`` read the model
    directory's ``*.safetensors``; like vLLM, they refuse a directory without any (:class:`EngineError`)
    rather than serve random weights. A bundled config has no checkpoint: epkit's own models
    (``epkit-*``) are random by design, any other bundled name needs ``--load-format dummy``.
    """
    if cfg.load_format == "dummy":
        return None, f"random (--load-format dummy, seed {cfg.seed})"
    fmt = f"load_format={cfg.load_format!r}"
    if model_dir is None:
        if cfg.model.startswith(OWN_MODEL_PREFIX) and cfg.load_format == "auto":
            return None, f"random (seed {cfg.seed}): {cfg.model} is one of epkit's own models, which have no checkpoint"
        raise EngineError(f"model={cfg.model!r} is a config bundled with epkit, without weights: {fmt} would need its "
                          "checkpoint (vLLM downloads it; epkit downloads nothing). Pass --load-format dummy for random "
                          "weights, or a local directory with config.json and *.safetensors")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted({f.suffix for pattern in ("*.bin", "*.pt", "*.pth", "*.gguf") for f in model_dir.glob(pattern)})
        found = f" (it holds {', '.join('*' + s for s in others)} files, which the built-in engine does not read)" if others else ""
        raise EngineError(f"model={str(model_dir)!r} holds no weight files (*.safetensors){found}: {fmt} refuses to serve "
                          "random weights, as vLLM does; pass --load-format dummy for random weights from --seed")
    size = sum(f.stat().st_size for f in files)
    shown = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return model_dir, f"read from {len(files)} file(s) in {model_dir} ({shown}; {size / 2**20:.1f} MiB)"


def position_logprobs(logits: torch.Tensor, chosen: list[int], ks: list[int]) -> list[PositionLogprobs]:
    """Per row: (chosen token, its logprob, its rank), then the ``k`` most likely (id, logprob, rank 1..k).

    Log-probabilities are ``log_softmax`` of the float32 logits (vLLM's ``raw_logprobs``); ``k = -1`` is the
    whole vocabulary. One host transfer for all rows."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vocab = lp.shape[-1]
    ks = [vocab if k == -1 else min(k, vocab) for k in ks]
    ids = torch.tensor(chosen, device=lp.device).unsqueeze(1)
    own = lp.gather(1, ids)
    rank = (lp >= own).sum(dim=1, keepdim=True)  # vLLM's rank: tokens at least as likely, itself included
    top_v, top_i = lp.topk(max(ks), dim=-1) if max(ks) > 0 else (lp[:, :0], ids[:, :0])
    own_l, rank_l, top_vl, top_il = own.squeeze(1).tolist(), rank.squeeze(1).tolist(), top_v.tolist(), top_i.tolist()
    return [((c, own_l[r], rank_l[r]),) + tuple((top_il[r][j], top_vl[r][j], j + 1) for j in range(ks[r]))
            for r, c in enumerate(chosen)]


def resolve_dtype(cfg: EngineConfig, model_config: dict, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (exact, fast enough) and the checkpoint dtype on GPU."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(str(model_config.get("torch_dtype") or "bfloat16"), torch.bfloat16)


def step_inputs(batch: list[tuple[Sequence, int]], block_size: int, device: torch.device,
                batch_decode: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMeta]:
    """(token ids, positions, attention metadata) of an eager step over ``batch``'s rows: one row per new token."""
    ids: list[int] = []
    positions: list[int] = []
    seqs_meta = []
    for seq, new in batch:
        start = seq.num_computed_tokens
        ids.extend(seq.token_ids[start : start + new])
        positions.extend(range(start, start + new))
        seqs_meta.append((start, new, seq.block_table))
    meta = build_meta(seqs_meta, block_size, device, batch_decode=batch_decode)
    return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(positions, dtype=torch.long, device=device),
            meta)


def device_memory_in_use(device: torch.device) -> int:
    """Bytes in use on ``device`` by anyone (0 on CPU)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


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
        if device.type == "cuda":
            # SDPA's cuDNN backend builds an execution plan for every new (batch, length) shape: with prompts of
            # varied length that was ~0.75 ms of host time per call, the GPU idle meanwhile (class (b), 1x H100)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.mcfg = ModelConfig.from_dict(model_config)
        self.dtype = resolve_dtype(cfg, model_config, device)
        self.max_model_len = cfg.max_model_len or self.mcfg.max_position_embeddings
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        limits = cfg.batch_limits(device.type, props.total_memory if props else 0, props.name if props else "",
                                  self.max_model_len)
        # one value on every rank (vLLM picks them once): ranks on different GPUs would otherwise capture different
        # graph sizes, whose collectives would not line up
        self.max_num_seqs, self.max_num_batched_tokens = (min(col) for col in zip(*comm.exchange_step_info(list(limits))))
        ep = cfg.ep_size
        self.placement = ExpertRanges(self.mcfg.num_experts, ep, dp_rank if ep > 1 else 0)
        self.rebalancer: Rebalancer | None = None
        if cfg.enable_eplb:
            eplb = resolve_eplb_config(cfg.eplb_config, self.mcfg.num_experts, ep)
            num_nodes = max(1, cfg.data_parallel_size // cfg.dp_size_local)
            self.rebalancer = Rebalancer(eplb, len(self.mcfg.moe_layers), self.mcfg.num_experts, ep, dp_rank, num_nodes,
                                         device, comm.all_reduce, comm.all_gather, cfg.model_name)
        experts_of_layer = self.rebalancer.local_experts if self.rebalancer else None
        weights_dir, self.weights_from = weight_source(cfg, model_dir)
        shards = expert_shards(cfg.data_parallel_size, cfg.enable_expert_parallel, dp_rank, self.mcfg.moe_intermediate_size)
        self._used_at_start = device_memory_in_use(device)  # CUDA context, NCCL: not charged to the KV cache (vLLM)
        weights = Weights(self.mcfg, self.placement, cfg.seed, device, self.dtype, weights_dir, experts_of_layer, shards)
        static_map = StaticExpertMap(self.placement, device)
        for layer in weights.layers:
            if "experts" in layer:
                if self.rebalancer:
                    self.rebalancer.attach(layer["experts"], layer["moe_pos"])
                else:
                    layer["experts"].map = static_map
        # DP without EP: experts tensor-parallel across the DP ranks, as vLLM (epkit.engine.moe_tp)
        moe = make_moe(shards, comm, device) or (ReplicatedMoE() if ep == 1 else make_backend(cfg.all2all_backend, comm, device))
        self.model = MoEModel(self.mcfg, weights, moe, self.max_model_len, device)
        if self.rebalancer is not None:
            self.model.record_routing = self.rebalancer.record
        self.block_size = cfg.block_size
        self._generators: dict[str, torch.Generator] = {}  # per request with a seed
        self._unseeded = torch.Generator(device=device)  # requests without a seed of their own: from --seed, as vLLM
        self._unseeded.manual_seed(cfg.seed * 65537 + dp_rank)
        self.num_blocks = self._num_blocks()  # on a GPU after a profiled dummy step (epkit.engine.profile)
        slots = (self.num_blocks + 1) * self.block_size  # + one scratch block for the padding rows of graph steps
        shape = (slots, self.mcfg.num_kv_heads, self.mcfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=device), torch.zeros(shape, dtype=self.dtype, device=device))
                          for _ in range(self.mcfg.num_layers)]
        self.step_logprobs: dict[str, PositionLogprobs] = {}  # the last step's, for the scheduler's outputs
        self.step_prompt_logprobs: dict[str, tuple[int, list[PositionLogprobs]]] = {}
        mode, why = graph_mode(self)
        # all ranks or none: a rank without graphs would run eager steps whose collectives the others do not
        if not all(on for on, in comm.exchange_step_info([int(mode != "off")])) and mode != "off":
            mode, why = "off", "another DP rank cannot use CUDA graphs (see its log); every step runs eager on all ranks"
        self.graphs = StepGraphs(self, mode) if mode != "off" else None
        if self.graphs is not None:
            self.graphs.capture_all()
        log.info("DP rank %d: graph steps: %s%s", dp_rank, why,
                 f" ({'mixed prefill + decode' if self.graphs.mixed else 'all-decode'} steps of "
                 f"{self.graphs.sizes[0]}..{self.graphs.sizes[-1]} rows, context buckets of "
                 f"{self.graphs.ctx_step} up to {self.graphs.max_ctx})" if self.graphs else "")
        held = (f"{self.rebalancer.slots_per_rank} expert slots of {self.rebalancer.num_physical} (EPLB)" if self.rebalancer
                else f"all {self.mcfg.num_experts} experts, a 1/{cfg.data_parallel_size} slice of each (tensor-parallel)"
                if shards is not None else
                f"experts {self.placement.local_experts[0]}..{self.placement.local_experts[-1]} of {self.mcfg.num_experts}")
        log.info("DP rank %d: %s %s, %s (ep=%d, %s), KV cache %d blocks x %d tokens, max_num_seqs=%d, "
                 "max_num_batched_tokens=%d", dp_rank, device, str(self.dtype).replace("torch.", ""), held, ep,
                 getattr(moe, "name", "?"), self.num_blocks, self.block_size, self.max_num_seqs,
                 self.max_num_batched_tokens)

    def _num_blocks(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        block_bytes = self.mcfg.kv_bytes_per_token(elem) * self.block_size
        # the profile step runs collectives (MoE exchange): every DP rank profiles, or none does
        profiles = int(self.device.type == "cuda" and self.cfg.kv_cache_memory_bytes is None
                       and env_value("EPKIT_KV_PROFILE") == "auto")
        said = [flag for flag, in self.comm.exchange_step_info([profiles])]
        if len(set(said)) > 1:
            raise EngineError(f"DP ranks disagree on profiling a step to size the KV cache (rank -> profiles: "
                              f"{dict(enumerate(said))}): give every node the same --kv-cache-memory-bytes and "
                              "EPKIT_KV_PROFILE")
        if self.cfg.kv_cache_memory_bytes is not None:
            budget = self.cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._gpu_budget(block_bytes)
        else:
            budget = CPU_KV_DEFAULT_BYTES
        return kv_blocks(budget, block_bytes, self.block_size, self.max_model_len)

    def _gpu_budget(self, block_bytes: int) -> int:
        """KV bytes on this GPU: after a profiled dummy step (``EPKIT_KV_PROFILE=auto``), else with the fixed reserve."""
        profile: StepProfile | None = None
        why = "EPKIT_KV_PROFILE=off"
        if env_value("EPKIT_KV_PROFILE") == "auto":
            try:
                profile = profile_step(self)
            except Exception as exc:  # e.g. torch.cuda.OutOfMemoryError: the old fixed reserve, and say why
                if self.comm.world_size > 1:  # the other ranks may wait in the step's collectives: no fallback
                    raise EngineError(
                        f"DP rank {self.comm.rank}: the KV-sizing profile step failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); with several DP ranks there is no fallback "
                        "(the ranks' collectives would no longer line up): set --kv-cache-memory-bytes, or "
                        "EPKIT_KV_PROFILE=off for the fixed activation reserve, or lower --max-num-batched-tokens"
                    ) from exc
                why = f"the profile run failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                log.warning("DP rank %d: KV cache sizing: %s; falling back to the fixed %.1f GiB activation reserve",
                            self.comm.rank, why, GPU_ACTIVATION_RESERVE_BYTES / 2**30)
            torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        non_torch = max(0, total - free - reserved - self._used_at_start)
        used = allocated + non_torch  # as vLLM: live tensors + memory others took since start, not the allocator's cache
        util, gib = self.cfg.gpu_memory_utilization, 2**30
        if profile is None:
            budget = kv_budget(total, used, util, None, 0)
            reserves = f"fixed activation reserve {GPU_ACTIVATION_RESERVE_BYTES / gib:.2f} GiB ({why})"
        else:
            graphs = graph_mode(self)[0] == "cuda"
            budget = kv_budget(total, used, util, profile.peak, profile.tokens, graphs, profile.forward_peak)
            reserves = (f"profiled step of {profile.tokens} tokens ({profile.seqs} seqs): activation peak "
                        f"{profile.peak / gib:.2f} GiB (forward {profile.forward_peak / gib:.2f}, sampler "
                        f"{profile.sampler_peak / gib:.2f}), CUDA-graph reserve "
                        f"{graph_reserve(profile.forward_peak, profile.tokens, graphs) / gib:.2f} GiB, "
                        f"margin {KV_MARGIN_BYTES / gib:.2f} GiB")
        log.info("DP rank %d: KV cache sizing: %.2f GiB total x %.2f; %.2f GiB in use = %.2f GiB of tensors (weights, "
                 "buffers) + %.2f GiB non-torch since start (not counted: %.2f GiB in use at start, %.2f GiB cached by "
                 "the allocator); %s. Available KV cache memory: %.2f GiB; GPU KV cache size: %d tokens", self.comm.rank,
                 total / gib, util, used / gib, allocated / gib, non_torch / gib, self._used_at_start / gib,
                 (reserved - allocated) / gib, reserves, budget / gib,
                 max(budget // block_bytes - 1, 0) * self.block_size)
        return budget

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
            ids, positions, meta = step_inputs(batch, self.block_size, self.device, batch_decode=self.device.type == "cuda")
            hidden = self.model.forward(ids, positions, meta, self.kv_caches, counts)
        rows, seqs, row = [], [], 0  # the last new token of every sequence whose prompt is now complete samples
        for seq, new in batch:
            row += new
            if seq.num_computed_tokens + new == seq.num_tokens:
                rows.append(row - 1)
                seqs.append(seq)
        sampled: dict[str, int] = {}
        self.step_logprobs, self.step_prompt_logprobs = {}, {}
        if any(seq.params.prompt_logprobs is not None for seq, _ in batch):
            self.step_prompt_logprobs = self._prompt_logprobs(batch, hidden)
        if seqs:
            if len(rows) < hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, device=self.device)]
            logits = self.model.logits(hidden)
            tokens = self._sample(logits, seqs)
            sampled = dict(zip((s.request_id for s in seqs), tokens))
            want = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
            if want:
                index = torch.tensor(want, device=self.device)
                entries = position_logprobs(logits[index], [tokens[i] for i in want], [seqs[i].params.logprobs for i in want])
                self.step_logprobs = {seqs[i].request_id: e for i, e in zip(want, entries)}
        self._end_step(started, bool(seqs))
        return sampled

    def _prompt_logprobs(self, batch: list[tuple[Sequence, int]], hidden: torch.Tensor) -> dict[str, tuple[int, list]]:
        """(first position, entries) of the prompt positions this step computed, per request that asked: the row
        of position ``p`` scores prompt token ``p + 1``. Positions already held (a recomputed prompt) are skipped."""
        rows, targets, ks, spans, row = [], [], [], {}, 0
        for seq, new in batch:
            start = seq.num_computed_tokens
            if seq.prompt_logprobs is not None:
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + new, seq.num_prompt_tokens - 1)
                if first < last:
                    spans[seq.request_id] = (first, len(rows), last - first)
                    rows.extend(range(row + first - start, row + last - start))
                    targets.extend(seq.token_ids[first + 1 : last + 1])
                    ks.extend([seq.params.prompt_logprobs] * (last - first))
            row += new
        if not rows:
            return {}
        entries = position_logprobs(self.model.logits(hidden[torch.tensor(rows, device=self.device)]), targets, ks)
        return {rid: (first, entries[at : at + n]) for rid, (first, at, n) in spans.items()}

    def _end_step(self, started: float, sampled: bool) -> None:
        if self.rebalancer is not None:  # after sampling: the step time includes the GPU's work (tolist syncs)
            self.rebalancer.end_step(self.model.w.layers, self.model.w.build_experts,
                                     time.perf_counter() - started if sampled else None)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row: argmax for greedy rows, a batched draw for the others; one host sync in all."""
        tokens = torch.argmax(logits, dim=-1)
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if len(rows) == len(seqs):  # every row draws: no copy of the logits
            tokens = self._draw(logits, seqs)
        elif rows:
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._draw(logits[index], [seqs[i] for i in rows])
        return tokens.tolist()

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k, top-p per row, then one sample per row without a host sync.

        The sample is ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn per token, which picks token
        ``i`` with probability ``p_i / sum(p)`` - a multinomial draw, batched. Rows without a
        ``seed`` share one draw from the runner's generator; a request with a ``seed`` draws its
        noise from its own seeded generator, so its tokens depend only on its logits and its
        seed, not on the rest of the batch (the invariance tests rely on it). At most ``SAMPLE_CHUNK_ROWS`` rows at a
        time: each row's draw is its own, and a full-vocabulary sort of 1,024 rows would hold several GiB at once."""
        if logits.shape[0] > SAMPLE_CHUNK_ROWS:
            step = SAMPLE_CHUNK_ROWS
            return torch.cat([ModelRunner._draw(self, logits[i : i + step], seqs[i : i + step])
                              for i in range(0, logits.shape[0], step)])
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
            del top  # [rows, k] values: not held through the top-p sort (the profiled sampler peak, profile.py)
        probs = torch.softmax(scaled, dim=-1)
        del scaled
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

    # ---- KV blocks for disaggregated prefill/decode (epkit.engine.kv_agent) ------------------
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of this cache: what a peer's pulled KV must match."""
        return self.mcfg.num_layers, self.mcfg.num_kv_heads, self.mcfg.head_dim

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        positions = torch.arange(num_tokens)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    @torch.inference_mode()
    def read_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """The K and V of a sequence's first ``num_tokens`` tokens, on the host: ``[layers, 2, tokens, heads, dim]``
        (one device-to-host copy, into pinned memory on a GPU)."""
        slots = self._slots(block_table, num_tokens)
        data = torch.stack([torch.stack((k[slots], v[slots])) for k, v in self.kv_caches])
        if self.device.type == "cpu":
            return data
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data)
        return host

    @torch.inference_mode()
    def write_kv(self, block_table: list[int], data: torch.Tensor) -> None:
        """Write ``[layers, 2, tokens, heads, dim]`` (from :meth:`read_kv`, maybe another engine's) into a
        sequence's blocks (one host-to-device copy, from the pinned receive buffer on a GPU)."""
        slots = self._slots(block_table, data.shape[2])
        data = data.to(self.device, dtype=self.dtype, non_blocking=True)
        for layer, (k, v) in enumerate(self.kv_caches):
            k[slots] = data[layer, 0]
            v[slots] = data[layer, 1]
