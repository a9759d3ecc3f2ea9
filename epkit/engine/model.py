"""Qwen3-MoE-family decoder: weights (dummy or safetensors) and the forward pass of one rank.

Per layer: RMSNorm -> GQA attention (fused QKV, per-head q/k RMSNorm for Qwen3, RoPE, paged
KV cache) -> RMSNorm -> MoE (softmax top-k router, SwiGLU experts via the all2all backend,
optional gated shared expert) or a dense SwiGLU MLP for ``mlp_only_layers``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from epkit.engine import batch_invariant
from epkit.engine.moe import LocalExperts, ExpertRanges, route, router_bias, use_triton
from epkit.engine.moe_tp import ExpertShards, SlicedExperts
from epkit.errors import EngineError

FAMILIES = ("qwen3_moe", "qwen2_moe")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the forward pass needs, read from a ``config.json`` dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int
    shared_expert_intermediate_size: int
    moe_layers: tuple[int, ...]
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    eos_token_id: int
    tie_word_embeddings: bool
    qk_norm: bool
    router_skew: float = 0.0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelConfig":
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise EngineError(f"model_type={model_type!r} is not served by the built-in engine; supported: {', '.join(FAMILIES)}")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        layers, step = int(config["num_hidden_layers"]), int(config.get("decoder_sparse_step", 1) or 1)
        mlp_only = {int(i) for i in config.get("mlp_only_layers") or ()}
        eos = config.get("eos_token_id", 257)
        skew = config.get("router_skew", 0.0)
        if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 0 <= skew < 1e4:
            raise EngineError(f"router_skew={skew!r} (config.json / --hf-overrides) must be a number >= 0 "
                              "(0 = unbiased router; 2-4 = strongly skewed)")
        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            num_experts=int(config["num_experts"]),
            top_k=int(config["num_experts_per_tok"]),
            moe_intermediate_size=int(config["moe_intermediate_size"]),
            intermediate_size=int(config.get("intermediate_size") or 0),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
            moe_layers=tuple(i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0),
            norm_topk_prob=bool(config.get("norm_topk_prob", model_type == "qwen3_moe")),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3_moe",
            router_skew=float(skew),
        )

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes


def _seed(seed: int, *parts: Any) -> int:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def init_tensor(shape: tuple[int, ...], std: float, seed: int, key: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A normal(0, std) tensor whose values depend only on (seed, key) - never on rank or placement."""
    gen = torch.Generator(device=device).manual_seed(_seed(seed, *key))
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


class Weights:
    """All tensors one rank holds; routed experts only for the logical experts it owns, and with ``shards`` (DP
    without EP) only this rank's slice of every expert's intermediate dimension (:mod:`epkit.engine.moe_tp`)."""

    def __init__(self, cfg: ModelConfig, placement: ExpertRanges, seed: int, device: torch.device, dtype: torch.dtype,
                 model_dir: Path | None = None, experts_of_layer: Callable[[int], list[int]] | None = None,
                 shards: ExpertShards | None = None):
        self.cfg, self.placement, self.device, self.dtype = cfg, placement, device, dtype
        self.shards = shards
        files = sorted(model_dir.glob("*.safetensors")) if model_dir is not None else []
        self._files = files
        self._seed = seed
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        self.embed = self._get(("embed",), "model.embed_tokens.weight", (cfg.vocab_size, h), 1.0, transpose=False)
        self.layers: list[dict[str, Any]] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layer: dict[str, Any] = {
                "input_norm": self._ones(("in_norm", i), p + "input_layernorm.weight", h),
                "post_norm": self._ones(("post_norm", i), p + "post_attention_layernorm.weight", h),
                "qkv": self._qkv(i, p, h, qkv_out),
                "o": self._get(("o", i), p + "self_attn.o_proj.weight", (cfg.num_heads * d, h), (cfg.num_heads * d) ** -0.5),
            }
            if cfg.qk_norm:
                layer["q_norm"] = self._ones(("q_norm", i), p + "self_attn.q_norm.weight", d)
                layer["k_norm"] = self._ones(("k_norm", i), p + "self_attn.k_norm.weight", d)
            if i in cfg.moe_layers:
                layer["moe_pos"] = cfg.moe_layers.index(i)
                layer["router"] = self._get(("router", i), p + "mlp.gate.weight", (h, cfg.num_experts), h ** -0.5)
                ids = experts_of_layer(layer["moe_pos"]) if experts_of_layer else placement.local_experts
                layer["experts"] = self.build_experts(i, ids)
                if cfg.shared_expert_intermediate_size:
                    layer["shared"] = self._mlp(("shared", i), p + "mlp.shared_expert.", cfg.shared_expert_intermediate_size)
                    layer["shared_gate"] = self._get(("shared_gate", i), p + "mlp.shared_expert_gate.weight", (h, 1), h ** -0.5)
            else:
                layer["mlp"] = self._mlp(("mlp", i), p + "mlp.", cfg.intermediate_size)
            self.layers.append(layer)
        self.norm = self._ones(("norm",), "model.norm.weight", h)
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed.t()
        else:
            self.lm_head = self._get(("lm_head",), "lm_head.weight", (h, cfg.vocab_size), h ** -0.5)

    # ---- sources ----------------------------------------------------------------------
    def _read(self, name: str) -> torch.Tensor | None:
        if not self._files:
            return None
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise EngineError(f"{self._files[0].parent} holds *.safetensors but the safetensors package is missing; "
                              "`pip install safetensors` or pass --load-format dummy") from exc

        for path in self._files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise EngineError(f"safetensors in {self._files[0].parent} lack tensor {name!r}")

    def _get(self, key: tuple, name: str, shape: tuple[int, int], std: float, transpose: bool = True) -> torch.Tensor:
        """``shape`` is the engine layout (in, out); checkpoints store (out, in)."""
        loaded = self._read(name)
        if loaded is None:
            return init_tensor(shape, std, self._seed, key, self.device, self.dtype)
        loaded = loaded.t() if transpose else loaded
        if tuple(loaded.shape) != tuple(shape):
            raise EngineError(f"tensor {name!r} has shape {tuple(loaded.shape)}, expected {shape} (after transpose)")
        return loaded.to(self.device, self.dtype).contiguous()

    def _ones(self, key: tuple, name: str, size: int) -> torch.Tensor:
        loaded = self._read(name)
        if loaded is None:
            return torch.ones(size, device=self.device, dtype=self.dtype)
        return loaded.to(self.device, self.dtype)

    def _qkv(self, i: int, p: str, h: int, out: int) -> torch.Tensor:
        cfg, d = self.cfg, self.cfg.head_dim
        parts = [("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d)]
        return torch.cat([self._get((n, i), f"{p}self_attn.{n}_proj.weight", (h, size), h ** -0.5) for n, size in parts], 1)

    def _mlp(self, key: tuple, prefix: str, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cfg.hidden_size
        gate = self._get((*key, "gate"), prefix + "gate_proj.weight", (h, inter), h ** -0.5)
        up = self._get((*key, "up"), prefix + "up_proj.weight", (h, inter), h ** -0.5)
        down = self._get((*key, "down"), prefix + "down_proj.weight", (inter, h), inter ** -0.5)
        return torch.cat([gate, up], 1), down

    def build_experts(self, i: int, logical_ids: list[int]) -> LocalExperts:
        """Layer ``i``'s routed experts for the given logical ids, in that (slot) order."""
        shards, prefix, inter = self.shards, f"model.layers.{i}.mlp.experts.", self.cfg.moe_intermediate_size
        if shards is not None and self.device.type == "cpu":  # sliced after the whole columns' fixed point is taken
            pairs = [self._mlp(("expert", i, e), f"{prefix}{e}.", inter) for e in logical_ids]
            return SlicedExperts.of(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]), shards)
        w13 = w2 = None
        for j, e in enumerate(logical_ids):
            a, b = self._mlp(("expert", i, e), f"{prefix}{e}.", inter)
            if shards is not None:  # a GPU holds one expert whole at a time at most
                a, b = shards.w13(a), shards.w2(b)
            if w13 is None:  # the layer's tensors first, each expert copied in: no list of them and no stack to
                # leave the allocator with freed blocks between the weights
                w13 = torch.empty((len(logical_ids), *a.shape), dtype=a.dtype, device=a.device)
                w2 = torch.empty((len(logical_ids), *b.shape), dtype=b.dtype, device=b.device)
            w13[j].copy_(a)
            w2[j].copy_(b)
        return LocalExperts(w13, w2)


def model_config_of(cfg) -> tuple[dict[str, Any], Path | None]:
    """The engine config's model ``config.json`` with ``--hf-overrides`` applied (as vLLM does)."""
    config, path = read_model_config(cfg.model)
    return {**config, **cfg.hf_overrides}, path


def read_model_config(model: str) -> tuple[dict[str, Any], Path | None]:
    """Resolve ``--model``: a directory with ``config.json`` or a name bundled with epkit."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise EngineError(f"model={model!r} is a directory without config.json")
        try:
            return json.loads(config_path.read_text()), path
        except json.JSONDecodeError as exc:
            raise EngineError(f"{config_path} is not valid JSON: {exc}") from exc
    from epkit.topology.models import ModelSpec, bundled_model_names
    from epkit.errors import TopologyError

    try:
        return dict(ModelSpec.load(model).raw), None
    except TopologyError as exc:
        raise EngineError(
            f"model={model!r} is neither a directory with config.json nor a bundled model; "
            f"bundled: {', '.join(bundled_model_names())}"
        ) from exc


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: one fused Triton launch where it passed its check, else PyTorch."""
    if use_triton(x):
        from epkit.engine import kernels

        if kernels.rms_norm_enabled(x, torch_rms_norm):
            return kernels.rms_norm(x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + r, rms_norm(x + r))``: a block's output added to the residual stream, then the next norm - one fused
    Triton launch where it passed its check (the sum bit for bit PyTorch's), else PyTorch's add and :func:`rms_norm`."""
    if use_triton(x):
        from epkit.engine import kernels

        if kernels.add_rms_norm_enabled(x, r, torch_rms_norm):
            return kernels.add_rms_norm(x, r, weight, eps)
    s = x + r
    return s, rms_norm(s, weight, eps)


def torch_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm (if ``weight``) then RoPE at ``positions`` (``cos``/``sin`` are the whole tables)."""
    if weight is not None:
        x = torch_rms_norm(x, weight, eps)
    return apply_rope(x, cos[positions], sin[positions])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w``; on CPU an exact fixed-point product, so a row's result does not depend on the batch
    (:mod:`epkit.engine.batch_invariant`). GPUs run one GEMM."""
    if x.device.type == "cpu":
        return batch_invariant.mm(x, w)
    return x @ w


def gate(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid`` of a ``[T, 1]`` gate; on CPU with the same arithmetic for every row (``batch_invariant.gate``)."""
    if x.device.type == "cpu":
        return batch_invariant.gate(x)
    return torch.sigmoid(x)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = linear(x, w13)
    inter = w2.shape[0]
    if x.device.type == "cpu":
        return linear(batch_invariant.silu_mul(h, inter), w2)
    return linear(F.silu(h[:, :inter]) * h[:, inter:], w2)


def rope_cache(cfg: ModelConfig, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; ``x`` is ``[T, heads, head_dim]``, ``cos``/``sin`` are ``[T, head_dim/2]``."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)


class MoEModel:
    """The forward pass of one rank: embeddings to final hidden states, then logits."""

    def __init__(self, cfg: ModelConfig, weights: Weights, moe, max_len: int, device: torch.device):
        self.cfg, self.w, self.moe = cfg, weights, moe
        self.cos, self.sin = rope_cache(cfg, max_len, device)
        self.record_routing: Callable[..., None] | None = None  # EPLB load statistics
        self.row_mask: torch.Tensor | None = None  # [T] real rows of a padded (CUDA-graph) step; None = all rows
        self.router_bias = router_bias(cfg.num_experts, cfg.router_skew, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                counts: list[int]) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for this step's tokens; every rank calls it every step."""
        from epkit.engine.attention import paged_attention

        cfg = self.cfg
        T, d = input_ids.shape[0], cfg.head_dim
        nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
        x = self.w.embed[input_ids]
        eps = cfg.rms_norm_eps
        fused = False
        if use_triton(x):
            from epkit.engine import kernels

            fused = kernels.norm_rope_enabled(x, d, cfg.qk_norm, torch_norm_rope)
        cos, sin = (None, None) if fused else (self.cos[positions], self.sin[positions])
        if meta.paged is not None:  # how the multi-token sequences attend, decided once for every layer
            meta.planned(x.new_empty((0, cfg.num_heads, d)), kv_caches[0][0])
        block_out = None  # the previous layer's MLP/MoE output: added to x by the next norm's launch
        for i, layer in enumerate(self.w.layers):
            if block_out is None:
                h = rms_norm(x, layer["input_norm"], eps)
            else:
                x, h = add_rms_norm(x, block_out, layer["input_norm"], eps)
            qkv = linear(h, layer["qkv"])
            q = qkv[:, :nq].reshape(T, cfg.num_heads, d)
            k = qkv[:, nq : nq + nkv].reshape(T, cfg.num_kv_heads, d)
            v = qkv[:, nq + nkv :].reshape(T, cfg.num_kv_heads, d)
            if fused:  # one launch each for q and k: q/k-norm + RoPE
                q = kernels.norm_rope(q, layer.get("q_norm"), eps, positions, self.cos, self.sin)
                k = kernels.norm_rope(k, layer.get("k_norm"), eps, positions, self.cos, self.sin)
            else:
                if cfg.qk_norm:
                    q = torch_rms_norm(q, layer["q_norm"], eps)
                    k = torch_rms_norm(k, layer["k_norm"], eps)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            attn = paged_attention(q, k, v, kv_caches[i][0], kv_caches[i][1], meta)
            x, h = add_rms_norm(x, linear(attn, layer["o"]), layer["post_norm"], eps)
            block_out = self._moe(h, layer, counts) if "experts" in layer else swiglu(h, *layer["mlp"])
        return x + block_out if block_out is not None else x

    def _moe(self, h: torch.Tensor, layer: dict[str, Any], counts: list[int]) -> torch.Tensor:
        logits, cfg = linear(h, layer["router"]), self.cfg
        ids = None
        if use_triton(logits):
            from epkit.engine import kernels

            if kernels.route_enabled(logits, cfg.top_k, cfg.norm_topk_prob, self.router_bias, route):
                ids, weights = kernels.route(logits, cfg.top_k, cfg.norm_topk_prob, self.router_bias)
        if ids is None:
            ids, weights = route(logits, cfg.top_k, cfg.norm_topk_prob, self.router_bias)
        if self.record_routing is not None:
            self.record_routing(layer["moe_pos"], ids, self.row_mask)
        out = self.moe(h, ids, weights, layer["experts"], counts)
        if "shared" in layer:
            out = out + gate(linear(h, layer["shared_gate"])) * swiglu(h, *layer["shared"])
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[S, vocab]`` for the given final hidden rows."""
        return linear(rms_norm(hidden, self.w.norm, self.cfg.rms_norm_eps), self.w.lm_head).float()
