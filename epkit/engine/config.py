"""Engine settings: one frozen dataclass that checks itself, built from `vllm serve` flags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from epkit.errors import EngineError
from epkit.topology.eplb import EPLB_COMMUNICATORS, EPLB_KEYS  # vLLM's --eplb-config keys

DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy", "safetensors")
KV_CACHE_DTYPES = ("auto",)  # the KV cache is kept in the model dtype
PREFIX_CACHING_HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")  # vLLM 0.32's choices
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # vLLM's --uvicorn-log-level choices


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EngineError(message)


def check_eplb_values(config: dict[str, Any]) -> None:
    """Type and range checks of the ``--eplb-config`` values given (no model needed).

    Raises :class:`EngineError` naming the key, the value and what is allowed.
    """
    for key in ("window_size", "step_interval", "log_balancedness_interval"):
        if key in config:
            value = config[key]
            _check(not isinstance(value, bool) and isinstance(value, int) and value >= 1,
                   f"eplb_config.{key}={value!r} must be an integer >= 1")
    if "num_redundant_experts" in config:
        value = config["num_redundant_experts"]
        _check(not isinstance(value, bool) and isinstance(value, int) and value >= 0,
               f"eplb_config.num_redundant_experts={value!r} must be an integer >= 0")
    for key in ("log_balancedness", "use_async", "enable_migration_batching"):
        if key in config:
            _check(isinstance(config[key], bool), f"eplb_config.{key}={config[key]!r} must be true or false")
    if config.get("communicator") is not None:
        _check(config["communicator"] in EPLB_COMMUNICATORS,
               f"eplb_config.communicator={config['communicator']!r}; allowed: {', '.join(EPLB_COMMUNICATORS)} (or null)")


# (max_num_seqs, max_num_batched_tokens) when unset: vLLM's API-server defaults ("large GPU": >= 70 GiB, not an A100);
# on CPU the engine's own (EngineConfig.batch_limits)
BATCH_DEFAULTS = {"large GPU": (1024, 8192), "other GPU": (256, 2048), "CPU": (256, 8192)}


@dataclass(frozen=True)
class EngineConfig:
    """Everything one deployment of the built-in engine needs; every node gets the same values.

    Field names and meanings follow `vllm serve` flags (``data_parallel_size`` is
    ``--data-parallel-size``). ``__post_init__`` rejects bad values with an
    :class:`EngineError` naming the field, the value and what is allowed.
    """

    model: str = "epkit-tiny-moe"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # None: vLLM's default for the device (batch_limits)
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.92  # vLLM's default since 0.2x (0.92 in 0.26 and 0.32)
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_size_local: int | None = None
    data_parallel_start_rank: int = 0
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 29550
    headless: bool = False
    api_server_count: int | None = None  # None: one per DP rank, vLLM's default (internal load balancing)
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    enable_eplb: bool = False
    eplb_config: dict[str, Any] = field(default_factory=dict)
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True  # vLLM's default for generative models
    prefix_caching_hash_algo: str = "sha256"
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # vLLM 0.32's: 0 = no cap
    long_prefill_token_threshold_adaptive: bool = False
    max_num_partial_prefills: int | None = None  # older vLLM's (gone in 0.32); None: no bound
    max_long_partial_prefills: int | None = None
    kv_cache_dtype: str = "auto"
    tokenizer: str | None = None
    max_logprobs: int = 20
    enable_log_requests: bool = False
    uvicorn_log_level: str = "warning"
    startup_timeout_s: float = 600.0
    kv_transfer_config: dict[str, Any] | None = None  # vLLM's --kv-transfer-config (NixlConnector's protocol)
    profiler_config: dict[str, Any] | None = None  # vLLM's --profiler-config (torch profiler; epkit/engine/profiler.py)

    def __post_init__(self) -> None:
        # all2all.BACKENDS' names, in its order; not all2all itself: it imports moe, whose kernels read this module
        from epkit.topology.backends import BUILTIN_BACKENDS, VENDOR_PACKAGES

        backends = (*BUILTIN_BACKENDS, *VENDOR_PACKAGES)

        if self.api_server_count is None and isinstance(self.data_parallel_size, int):
            object.__setattr__(self, "api_server_count", self.data_parallel_size)
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        _check(self.device in DEVICES, f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        _check(self.load_format in LOAD_FORMATS, f"load_format={self.load_format!r}; allowed: {', '.join(LOAD_FORMATS)}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype={self.kv_cache_dtype!r}: the built-in engine keeps the KV cache in the model dtype; "
               f"allowed: {', '.join(KV_CACHE_DTYPES)}")
        _check(self.uvicorn_log_level in UVICORN_LOG_LEVELS,
               f"uvicorn_log_level={self.uvicorn_log_level!r}; allowed: {', '.join(UVICORN_LOG_LEVELS)}")
        _check(not isinstance(self.max_logprobs, bool) and isinstance(self.max_logprobs, int) and self.max_logprobs >= -1,
               f"max_logprobs={self.max_logprobs!r} must be an integer >= -1 (-1: the whole vocabulary)")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "data_parallel_size",
                     "tensor_parallel_size", "api_server_count"):
            value = getattr(self, name)
            if value is None and name in ("max_num_seqs", "max_num_batched_tokens"):
                continue  # the device's default, as vLLM picks it (batch_limits)
            _check(isinstance(value, int) and value >= 1, f"{name}={value!r} must be an integer >= 1")
        _check(0 <= self.port <= 65535, f"port={self.port} must be in 0..65535")
        _check(1 <= self.data_parallel_rpc_port <= 65535, f"data_parallel_rpc_port={self.data_parallel_rpc_port} must be in 1..65535")
        _check(self.tensor_parallel_size == 1,
               f"tensor_parallel_size={self.tensor_parallel_size}: the built-in engine supports only 1 "
               "(attention is data-parallel; use --data-parallel-size and --enable-expert-parallel)")
        _check(self.max_model_len is None or self.max_model_len >= 2, f"max_model_len={self.max_model_len} must be >= 2")
        local = self.dp_size_local
        _check(1 <= local <= self.data_parallel_size,
               f"data_parallel_size_local={local} must be in 1..data_parallel_size={self.data_parallel_size}")
        _check(0 <= self.data_parallel_start_rank and self.data_parallel_start_rank + local <= self.data_parallel_size,
               f"data_parallel_start_rank={self.data_parallel_start_rank} with data_parallel_size_local={local} "
               f"exceeds data_parallel_size={self.data_parallel_size}")
        _check(self.headless or self.data_parallel_start_rank == 0,
               f"data_parallel_start_rank={self.data_parallel_start_rank} needs --headless: only the primary node "
               "(start rank 0) runs the API server")
        _check(self.all2all_backend in backends,
               f"all2all_backend={self.all2all_backend!r}; allowed: {', '.join(backends)}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
               f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} must be > 0")
        _check(isinstance(self.hf_overrides, dict) and all(isinstance(k, str) for k in self.hf_overrides),
               f"hf_overrides={self.hf_overrides!r} must be a JSON object of config.json keys")
        _check(isinstance(self.eplb_config, dict), f"eplb_config={self.eplb_config!r} must be a JSON object")
        unknown = sorted(set(self.eplb_config) - set(EPLB_KEYS))
        _check(not unknown, f"eplb_config has unknown keys {unknown}; valid keys: {', '.join(EPLB_KEYS)}")
        _check(not self.enable_eplb or (self.enable_expert_parallel and self.data_parallel_size > 1),
               "enable_eplb=True needs expert parallelism: pass --enable-expert-parallel with --data-parallel-size > 1")
        if self.eplb_config:
            check_eplb_values(self.eplb_config)
        if self.kv_transfer_config is not None:
            from epkit.engine.kv_transfer import check_kv_transfer_config

            object.__setattr__(self, "kv_transfer_config", check_kv_transfer_config(self.kv_transfer_config))
        if self.profiler_config is not None:
            from epkit.engine.profiler import check_profiler_config

            object.__setattr__(self, "profiler_config", check_profiler_config(self.profiler_config))
        self._check_prefill_knobs()
        _check(self.prefix_caching_hash_algo in PREFIX_CACHING_HASH_ALGOS,
               f"prefix_caching_hash_algo={self.prefix_caching_hash_algo!r}; allowed: {', '.join(PREFIX_CACHING_HASH_ALGOS)}")
        if self.enable_prefix_caching and self.prefix_caching_hash_algo.startswith("xxhash"):
            import importlib.util

            _check(importlib.util.find_spec("xxhash") is not None,
                   f"prefix_caching_hash_algo={self.prefix_caching_hash_algo!r} needs the xxhash package "
                   "(pip install xxhash), as in vLLM; or use sha256")

    def _check_prefill_knobs(self) -> None:
        threshold = self.long_prefill_token_threshold
        _check(not isinstance(threshold, bool) and isinstance(threshold, int) and threshold >= 0,
               f"long_prefill_token_threshold={threshold!r} must be an integer >= 0 (0: no cap)")
        _check(self.max_model_len is None or threshold <= self.max_model_len,
               f"long_prefill_token_threshold={threshold} cannot be greater than max_model_len={self.max_model_len}")
        for name in ("max_num_partial_prefills", "max_long_partial_prefills"):
            value = getattr(self, name)
            _check(value is None or (not isinstance(value, bool) and isinstance(value, int) and value >= 1),
                   f"{name}={value!r} must be an integer >= 1 (unset: no bound)")
        many, long = self.max_num_partial_prefills, self.max_long_partial_prefills
        _check(many is None or long is None or long <= many,
               f"max_long_partial_prefills={long} must be <= max_num_partial_prefills={many}")
        _check(self.enable_chunked_prefill or many is None or many == 1,
               f"max_num_partial_prefills={many} needs chunked prefill (drop --no-enable-chunked-prefill), as in vLLM")

    # ---- derived ------------------------------------------------------------------
    def batch_limits(self, device_type: str, total_memory: int, device_name: str, max_model_len: int) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens): the values given, else vLLM's API-server defaults for the device
        (vLLM 0.26-0.32 ``EngineArgs.get_batch_defaults``): a GPU of >= 70 GiB other than an A100 1024 / 8192, other
        GPUs 256 / 2048. On CPU the engine keeps its own 256 / 8192 (vLLM's CPU build: 128 / 2048 per TP rank), which
        its CPU tests and benchmarks were made with. Without chunked prefill the token budget is at least the max
        model length, as in vLLM."""
        if device_type == "cuda":
            big = total_memory >= 70 * 2**30 and "a100" not in device_name.lower()
            seqs, tokens = BATCH_DEFAULTS["large GPU"] if big else BATCH_DEFAULTS["other GPU"]
        else:
            seqs, tokens = BATCH_DEFAULTS["CPU"]
        if self.max_num_batched_tokens is None and not self.enable_chunked_prefill:
            tokens = max(tokens, max_model_len)
        return self.max_num_seqs or seqs, self.max_num_batched_tokens or tokens

    @property
    def dp_size_local(self) -> int:
        return self.data_parallel_size if self.data_parallel_size_local is None else self.data_parallel_size_local

    @property
    def local_dp_ranks(self) -> list[int]:
        start = self.data_parallel_start_rank
        return list(range(start, start + self.dp_size_local))

    @property
    def ep_size(self) -> int:
        """EP_SIZE = TP_SIZE × DP_SIZE when expert parallelism is on, else 1 (experts replicated)."""
        return self.tensor_parallel_size * self.data_parallel_size if self.enable_expert_parallel else 1

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


# ---- environment variables ------------------------------------------------------------
class EnvVarError(EngineError, ValueError):
    """An ``EPKIT_*`` environment variable has a value the engine does not know."""


@dataclass(frozen=True)
class EnvVar:
    """One ``EPKIT_*`` variable the engine reads: its values, default, meaning and former name."""

    name: str
    values: tuple[str, ...] | None  # None: an integer >= 1
    default: str
    meaning: str
    old_name: str | None = None
    old_values: dict[str, str] | None = None  # a former name's value -> this variable's value

    def describe_allowed(self) -> str:
        if self.values is None:
            return "an integer >= 1"
        return ", ".join(self.values[:-1]) + f" or {self.values[-1]}" if len(self.values) > 1 else self.values[0]


ENV_VARS = {v.name: v for v in (
    EnvVar("EPKIT_FUSED_KERNELS", ("auto", "torch"), "auto",
           "the engine's small fused Triton kernels - RMSNorm, q/k-norm + RoPE, router softmax + top-k, MoE row "
           "sort / gather / combine, SiLU * up, the MoE expert GEMMs at decode sizes, the K/V cache write: auto uses "
           "each where it passed its first-use check, torch keeps the PyTorch code for all of them",
           old_name="EPKIT_FUSED_NORMS", old_values={"1": "auto", "0": "torch"}),
    EnvVar("EPKIT_DECODE_ATTENTION", ("auto", "torch"), "auto",
           "paged decode attention (decodes and graph-step rows): auto = the Triton kernel where it passed its check, "
           "torch = PyTorch gather + matmul"),
    EnvVar("EPKIT_PREFILL_ATTENTION", ("auto", "triton", "torch"), "auto",
           "attention of multi-token sequences: auto = SDPA for a burst of equal whole prompts and the Triton paged "
           "prefill kernel for the rest, triton = the kernel for all, torch = SDPA only"),
    EnvVar("EPKIT_MOE_GEMM", ("auto", "triton", "torch"), "auto",
           "expert GEMMs at decode sizes: auto = the Triton kernel where it matches and is faster, triton = the kernel "
           "without timing it, torch = torch._grouped_mm"),
    EnvVar("EPKIT_CUDA_GRAPHS", ("auto", "emulate", "off"), "auto",
           "graph steps: auto = CUDA graphs where the device and backend allow, emulate = the padded fixed-buffer "
           "step without capture (any device; the tests' CPU path), off = every step eager",
           old_name="EPKIT_DECODE_GRAPHS"),
    EnvVar("EPKIT_GRAPH_STEPS", ("mixed", "decode"), "mixed",
           "which steps run as graphs: mixed = prefill + decode steps up to 1,024 tokens, decode = all-decode steps only"),
    EnvVar("EPKIT_KV_PROFILE", ("auto", "off"), "auto",
           "GPU KV cache sizing: auto = reserve the measured peak of a profiled dummy step of max_num_batched_tokens "
           "tokens (plus a CUDA-graph reserve and a 512 MiB margin), as vLLM; off = a fixed 6 GiB activation reserve"),
    EnvVar("EPKIT_CPU_THREADS", None, "1", "torch threads per engine-core process on CPU"),
    EnvVar("EPKIT_KV_TRANSPORT", ("auto", "tcp", "nixl"), "auto",
           "how a decode pulls its prompt's KV from the prefill (--kv-transfer-config): auto = NIXL READs where the "
           "nixl package loads on both sides, else TCP; tcp = always TCP; nixl = NIXL or fail at start"),
)}


def _env_raw(var: EnvVar, environ) -> tuple[str | None, str]:
    """(value, the variable it came from), the current name first, then the former one (value translated)."""
    value = environ.get(var.name)
    if value is not None or var.old_name is None:
        return value, var.name
    old = environ.get(var.old_name)
    if old is None:
        return None, var.name
    if var.old_values is not None:
        if old not in var.old_values:
            raise EnvVarError(f"{var.old_name}={old!r}: expected {' or '.join(var.old_values)} "
                              f"(deprecated name of {var.name}: {var.describe_allowed()})")
        old = var.old_values[old]
    return old, var.old_name


def env_value(name: str, environ=None) -> str:
    """The value of the engine's environment variable ``name`` (its default when unset), checked.

    A former name (``EnvVar.old_name``) is still read, its value translated. Raises :class:`EnvVarError`
    naming the variable, the value and the allowed values.
    """
    var = ENV_VARS[name]
    value, source = _env_raw(var, os.environ if environ is None else environ)
    if value is None:
        return var.default
    ok = value in var.values if var.values is not None else (value.strip().isdigit() and int(value) >= 1)
    if not ok:
        raise EnvVarError(f"{source}={value!r}: expected {var.describe_allowed()} ({var.meaning})")
    return value


def check_environment(environ=None) -> list[str]:
    """Check every ``EPKIT_*`` variable the engine reads; returns warnings to log once at start.

    Warnings: one per former name in use, one per unknown ``EPKIT_*`` name that looks like a typo of the
    engine's (``EPKIT_FUSED_KERNEL``). Raises :class:`EnvVarError` for a bad value and for a current and a
    former name both set to different values.
    """
    import difflib

    environ = os.environ if environ is None else environ
    known = set(ENV_VARS) | {v.old_name for v in ENV_VARS.values() if v.old_name}
    notes = []
    for name in sorted(n for n in environ if n.startswith("EPKIT_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
        if close:
            notes.append(f"{name} is not read by the engine; did you mean {close[0]}?")
    for var in ENV_VARS.values():
        env_value(var.name, environ)
        if var.old_name is not None and var.old_name in environ:
            if var.name in environ:
                current = environ[var.name]
                old = _env_raw(var, {var.old_name: environ[var.old_name]})[0]
                if old != current:
                    raise EnvVarError(f"{var.old_name}={environ[var.old_name]!r} (deprecated) and {var.name}={current!r} "
                                      f"disagree; set only {var.name}")
            new = _env_raw(var, {var.old_name: environ[var.old_name]})[0]
            notes.append(f"{var.old_name} is deprecated; use {var.name}={new} (same effect)")
    return notes
