"""ModelSpec: the sizes epkit plans with, read from a Hugging Face ``config.json``.

Supported families: DeepSeek-V2/V3/R1 (MLA attention, grouped routing, fp8 block
quantization), Qwen2/Qwen3-MoE, Mixtral and gpt-oss (mxfp4 experts). Nothing is
downloaded: a config comes from a path, a dict, or a name bundled in
``epkit/topology/models/`` (``deepseek-ai/DeepSeek-V3-0324`` is stored as
``deepseek-ai--DeepSeek-V3-0324.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from epkit.errors import TopologyError

DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float8_e4m3fn": 1.0}

MOE_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")


def bundled_model_names() -> list[str]:
    """Names accepted by :meth:`ModelSpec.load` without a path (``org/name`` form)."""
    folder = resources.files("epkit.topology") / "models"
    names = [p.name[: -len(".json")].replace("--", "/") for p in folder.iterdir() if p.name.endswith(".json")]
    return sorted(names)


def _read_bundled(name: str) -> dict[str, Any] | None:
    folder = resources.files("epkit.topology") / "models"
    candidate = folder / (name.replace("/", "--") + ".json")
    if candidate.is_file():
        return json.loads(candidate.read_text())
    return None


@dataclass(frozen=True)
class Quantization:
    """How expert (and other linear) weights are stored: bytes per parameter incl. scales."""

    method: str  # "none", "fp8", "mxfp4"
    weight_bytes: float  # bytes per weight element, excluding scales
    block: tuple[int, int] | None = None  # fp8 block scales (rows, cols)
    group_size: int | None = None  # mxfp4: elements per shared scale
    scale_bytes: float = 0.0

    def matrix_bytes(self, rows: int, cols: int) -> float:
        """Bytes to store one ``rows × cols`` weight matrix, scales included."""
        elements = rows * cols
        if self.block is not None:
            br, bc = self.block
            scales = -(-rows // br) * -(-cols // bc)
            return elements * self.weight_bytes + scales * self.scale_bytes
        if self.group_size is not None:
            return elements * self.weight_bytes + (elements / self.group_size) * self.scale_bytes
        return elements * self.weight_bytes


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a MoE model that planning needs; build with :meth:`load`."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    moe_layer_indices: tuple[int, ...]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    dense_intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    expert_quant: Quantization
    dense_quant: Quantization
    num_expert_groups: int = 1
    topk_group: int = 1
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    kv_lora_rank: int = 0  # > 0 means MLA attention (DeepSeek)
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    attention_bias: bool = False
    expert_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any], name: str | None = None) -> "ModelSpec":
        """Read a config from a bundled name, a ``config.json`` path (or its folder), or a dict."""
        if isinstance(source, Mapping):
            return cls.from_config(dict(source), name=name or str(source.get("_name_or_path", "custom")))
        text = str(source)
        bundled = _read_bundled(text)
        if bundled is not None:
            return cls.from_config(bundled, name=name or text)
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise TopologyError(f"model config {path} is not valid JSON: {exc}") from exc
            return cls.from_config(config, name=name or text)
        raise TopologyError(
            f"model={text!r} is neither a bundled model nor a config.json path; "
            f"bundled models: {', '.join(bundled_model_names())}. "
            "For another model pass model_config: <path to its config.json>."
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "custom") -> "ModelSpec":
        """Build from the parsed contents of a Hugging Face ``config.json``."""
        model_type = config.get("model_type")
        if model_type not in MOE_FAMILIES:
            raise TopologyError(
                f"model {name!r}: model_type={model_type!r} is not a supported MoE family; "
                f"supported: {', '.join(MOE_FAMILIES)}"
            )
        need = _reader(config, f"model {name!r} ({model_type})")
        hidden = int(need("hidden_size"))
        layers = int(need("num_hidden_layers"))
        heads = int(need("num_attention_heads"))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise TopologyError(f"model {name!r}: torch_dtype={dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
        expert_quant, dense_quant = _quantization(config, name, dtype)
        spec = cls(
            name=name,
            model_type=model_type,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=int(need("vocab_size")),
            num_attention_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            dtype=dtype,
            expert_quant=expert_quant,
            dense_quant=dense_quant,
            top_k=int(need("num_experts_per_tok", "experts_per_token")),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0),
            raw=config,
            **_moe_fields(model_type, config, layers, need),
        )
        if spec.top_k > spec.num_experts:
            raise TopologyError(
                f"model {name!r}: num_experts_per_tok={spec.top_k} exceeds the {spec.num_experts} routed experts"
            )
        return spec

    # ---- derived sizes ----------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def params_per_expert(self) -> int:
        """Parameters of one routed expert (gate, up and down projections, plus biases)."""
        weights = 3 * self.hidden_size * self.moe_intermediate_size
        biases = (2 * self.moe_intermediate_size + self.hidden_size) if self.expert_bias else 0
        return weights + biases

    @cached_property
    def bytes_per_expert(self) -> float:
        """Bytes of one routed expert in one layer, quantization scales included."""
        q = self.expert_quant
        h, i = self.hidden_size, self.moe_intermediate_size
        total = 2 * q.matrix_bytes(i, h) + q.matrix_bytes(h, i)
        if self.expert_bias:
            total += (2 * i + h) * DTYPE_BYTES[self.dtype]
        return total

    @property
    def routed_expert_params(self) -> int:
        return self.params_per_expert * self.num_experts * self.num_moe_layers

    @property
    def routed_expert_bytes(self) -> float:
        return self.bytes_per_expert * self.num_experts * self.num_moe_layers

    def _attention_matrices(self) -> list[tuple[int, int]]:
        h = self.hidden_size
        if self.uses_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            mats = []
            if self.q_lora_rank:
                mats += [(self.q_lora_rank, h), (self.num_attention_heads * qk_head, self.q_lora_rank)]
            else:
                mats += [(self.num_attention_heads * qk_head, h)]
            mats += [
                (self.kv_lora_rank + self.qk_rope_head_dim, h),
                (self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
                (h, self.num_attention_heads * self.v_head_dim),
            ]
            return mats
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q)]

    @cached_property
    def attention_params_per_layer(self) -> int:
        return sum(r * c for r, c in self._attention_matrices())

    @cached_property
    def attention_bytes_per_layer(self) -> float:
        return sum(self.dense_quant.matrix_bytes(r, c) for r, c in self._attention_matrices())

    def _dense_mlp_bytes(self, intermediate: int) -> float:
        h, q = self.hidden_size, self.dense_quant
        return 2 * q.matrix_bytes(intermediate, h) + q.matrix_bytes(h, intermediate)

    @cached_property
    def non_expert_params(self) -> int:
        """Everything but routed experts: attention, dense MLPs, shared experts, routers, embeddings."""
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        dense_mlp = self.num_dense_layers * 3 * h * self.dense_intermediate_size
        shared = self.num_moe_layers * self.num_shared_experts * 3 * h * self.shared_expert_intermediate_size
        routers = self.num_moe_layers * self.num_experts * h
        return embed + self.num_layers * self.attention_params_per_layer + dense_mlp + shared + routers

    @cached_property
    def non_expert_bytes(self) -> float:
        """Bytes of everything but routed experts (the part every DP rank replicates)."""
        h, elem = self.hidden_size, DTYPE_BYTES[self.dtype]
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) * elem
        dense_mlp = self.num_dense_layers * self._dense_mlp_bytes(self.dense_intermediate_size)
        shared = self.num_moe_layers * self.num_shared_experts * self._dense_mlp_bytes(
            self.shared_expert_intermediate_size or 1
        ) if self.num_shared_experts else 0.0
        routers = self.num_moe_layers * self.num_experts * h * elem
        return embed + self.num_layers * self.attention_bytes_per_layer + dense_mlp + shared + routers

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params

    @property
    def total_bytes(self) -> float:
        return self.non_expert_bytes + self.routed_expert_bytes

    def kv_bytes_per_token(self, tp: int = 1, kv_dtype_bytes: float | None = None) -> float:
        """KV-cache bytes one token occupies on one GPU (MLA latents are not split by TP)."""
        elem = kv_dtype_bytes if kv_dtype_bytes is not None else DTYPE_BYTES.get(self.dtype, 2.0)
        if self.uses_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_layers * elem
        kv_heads_per_gpu = max(1, self.num_kv_heads // tp) if self.num_kv_heads >= tp else 1
        return 2 * kv_heads_per_gpu * self.head_dim * self.num_layers * elem

    def summary(self) -> dict[str, Any]:
        """The derived sizes as a flat dict (for tables and ``--format json``)."""
        return {
            "model": self.name,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_moe_layers": self.num_moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_expert_groups": self.num_expert_groups,
            "topk_group": self.topk_group,
            "num_shared_experts": self.num_shared_experts,
            "expert_quantization": self.expert_quant.method,
            "bytes_per_expert": self.bytes_per_expert,
            "routed_expert_bytes": self.routed_expert_bytes,
            "non_expert_bytes": self.non_expert_bytes,
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
        }


def _reader(config: dict[str, Any], what: str):
    """``need(key, *alternatives)``: the first of those keys the config sets, else an error naming them."""
    def need(key: str, *alternatives: str) -> Any:
        for k in (key, *alternatives):
            if k in config and config[k] is not None:
                return config[k]
        raise TopologyError(f"{what}: config.json lacks {' or '.join((key, *alternatives))}")

    return need


def _quantization(config: dict[str, Any], name: str, dtype: str) -> tuple[Quantization, Quantization]:
    """(expert weights', dense weights') storage, from ``quantization_config``."""
    plain = Quantization("none", DTYPE_BYTES[dtype])
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return plain, plain
    if method == "fp8":
        block = tuple(config["quantization_config"].get("weight_block_size") or (128, 128))
        fp8 = Quantization("fp8", 1.0, block=(int(block[0]), int(block[1])), scale_bytes=4.0)
        return fp8, fp8
    if method == "mxfp4":  # 4-bit E2M1 elements, one E8M0 scale byte per 32 elements; attention stays bf16
        return Quantization("mxfp4", 0.5, group_size=32, scale_bytes=1.0), plain
    raise TopologyError(f"model {name!r}: quantization_config.quant_method={method!r}; supported: fp8, mxfp4")


def _moe_fields(model_type: str, config: dict[str, Any], layers: int, need) -> dict[str, Any]:
    """The family's MoE layout: which layers are MoE, experts, expert and dense sizes, MLA sizes."""
    if model_type in ("deepseek_v2", "deepseek_v3"):
        first_dense = int(config.get("first_k_dense_replace", 0))
        freq = int(config.get("moe_layer_freq", 1))
        return dict(
            moe_layer_indices=tuple(i for i in range(layers) if i >= first_dense and i % freq == 0),
            num_experts=int(need("n_routed_experts")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            dense_intermediate_size=int(need("intermediate_size")),
            num_expert_groups=int(config.get("n_group") or 1),
            topk_group=int(config.get("topk_group") or 1),
            num_shared_experts=int(config.get("n_shared_experts") or 0),
            shared_expert_intermediate_size=int(need("moe_intermediate_size")),
            kv_lora_rank=int(need("kv_lora_rank")),
            q_lora_rank=int(config.get("q_lora_rank") or 0),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(config.get("decoder_sparse_step", 1))
        mlp_only = {int(i) for i in config.get("mlp_only_layers") or ()}
        experts = int(need("num_experts"))
        shared_size = int(config.get("shared_expert_intermediate_size") or 0)
        return dict(
            moe_layer_indices=tuple(i for i in range(layers)
                                    if i not in mlp_only and experts > 0 and step > 0 and (i + 1) % step == 0),
            num_experts=experts,
            moe_intermediate_size=int(need("moe_intermediate_size")),
            dense_intermediate_size=int(need("intermediate_size")),
            num_shared_experts=1 if shared_size else 0,
            shared_expert_intermediate_size=shared_size,
        )
    return dict(  # mixtral, gpt_oss: every layer is MoE
        moe_layer_indices=tuple(range(layers)),
        num_experts=int(need("num_local_experts")),
        moe_intermediate_size=int(need("intermediate_size")),
        dense_intermediate_size=0,
        expert_bias=model_type == "gpt_oss",
    )
