"""``epkit serve``: the built-in engine's command line, spelled like ``vllm serve``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from epkit.errors import EngineError

# flag -> EngineConfig field, for the flags that map one to one.
FLAG_FIELDS = {
    "--served-model-name": "served_model_name",
    "--host": "host",
    "--port": "port",
    "--api-key": "api_key",
    "--seed": "seed",
    "--dtype": "dtype",
    "--device": "device",
    "--load-format": "load_format",
    "--max-model-len": "max_model_len",
    "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--block-size": "block_size",
    "--kv-cache-memory-bytes": "kv_cache_memory_bytes",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--tensor-parallel-size": "tensor_parallel_size",
    "--data-parallel-size": "data_parallel_size",
    "--data-parallel-size-local": "data_parallel_size_local",
    "--data-parallel-start-rank": "data_parallel_start_rank",
    "--data-parallel-address": "data_parallel_address",
    "--data-parallel-rpc-port": "data_parallel_rpc_port",
    "--api-server-count": "api_server_count",
    "--all2all-backend": "all2all_backend",
    "--tokenizer": "tokenizer",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--max-logprobs": "max_logprobs",
    "--uvicorn-log-level": "uvicorn_log_level",
    "--prefix-caching-hash-algo": "prefix_caching_hash_algo",
    "--long-prefill-token-threshold": "long_prefill_token_threshold",
    "--max-num-partial-prefills": "max_num_partial_prefills",
    "--max-long-partial-prefills": "max_long_partial_prefills",
}
INT_FIELDS = {"port", "seed", "max_num_seqs", "block_size", "kv_cache_memory_bytes", "max_logprobs",
              "tensor_parallel_size", "data_parallel_size", "data_parallel_size_local", "data_parallel_start_rank",
              "data_parallel_rpc_port", "api_server_count", "long_prefill_token_threshold", "max_num_partial_prefills",
              "max_long_partial_prefills"}
HUMAN_INT_FIELDS = {"max_model_len", "max_num_batched_tokens"}  # vLLM reads "32k" (32,000) and "32K" (32,768) too
SHORT = {"--tensor-parallel-size": "-tp", "--data-parallel-size": "-dp"}
HELP = {
    "tokenizer": "a local directory with tokenizer.json (or the file itself); default: the model directory's",
    "kv_cache_dtype": "only auto: the KV cache is kept in the model dtype",
    "max_logprobs": "largest logprobs / top_logprobs a request may ask for (-1: the whole vocabulary)",
    "uvicorn_log_level": "log level of the HTTP server (critical, error, warning, info, debug, trace)",
    "load_format": "auto / safetensors: read the model directory's *.safetensors (none there: an error); "
                   "dummy: random weights from --seed",
    "seed": "seed of dummy weights and of sampling for requests without their own seed",
    "prefix_caching_hash_algo": "hash of prefix-cache blocks: sha256, sha256_cbor (the same digests here), xxhash, "
                                "xxhash_cbor (need the xxhash package)",
    "long_prefill_token_threshold": "with chunked prefill, the most tokens of one prompt per step while other "
                                    "requests run or wait (vLLM's; 0: no cap)",
    "max_num_partial_prefills": "sequences prefilling in one step, at most (older vLLM's flag, gone in 0.32; "
                                "unset: no bound)",
    "max_long_partial_prefills": "of those, prompts longer than --long-prefill-token-threshold (else 4 %% of the "
                                 "max model length), at most (older vLLM's flag; unset: no bound)",
}
# `vllm serve` flags that mean nothing in the built-in engine: accepted, named in one warning at start.
NO_EFFECT = {
    "--trust-remote-code": "the engine runs no code from the model directory",
    "--disable-log-requests": "requests are logged only with --enable-log-requests, vLLM's current spelling",
}


def human_int(value: str) -> int:
    """An integer, or one with vLLM's suffixes: k/m/g/t are powers of 1000, K/M/G/T powers of 1024 ("8k" = 8000)."""
    text = value.strip()
    decimal = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if text and text[-1] in decimal:
            return int(float(text[:-1]) * decimal[text[-1]])
        if text and text[-1] in binary:
            return int(text[:-1]) * binary[text[-1]]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r} (e.g. 8192, 8k = 8000, 8K = 8192)") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``vllm serve`` spellings; ``--help`` lists every flag)."""
    from epkit.engine.config import EngineConfig

    defaults = EngineConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="epkit serve", description="Serve a Qwen3-MoE-family model with the built-in engine.")
    p.add_argument("model", nargs="?", default=None, help="bundled model name or a directory with config.json")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional argument")
    for flag, name in FLAG_FIELDS.items():
        names = [flag] + ([SHORT[flag]] if flag in SHORT else [])
        default = defaults[name].default
        shown = ("the data-parallel size, as in vLLM" if name == "api_server_count" else
                 _batch_default(name) if name in ("max_num_seqs", "max_num_batched_tokens") else default)
        kind = int if name in INT_FIELDS else human_int if name in HUMAN_INT_FIELDS else (
            float if name == "gpu_memory_utilization" else str)
        p.add_argument(*names, dest=name, type=kind, default=None,
                       help=(HELP[name] + " " if name in HELP else "") + f"(default: {shown})")
    p.add_argument("--enable-expert-parallel", "-ep", dest="enable_expert_parallel", action="store_true")
    p.add_argument("--headless", action="store_true", help="no API server: engine cores only (secondary nodes)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (every step eager)")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action=argparse.BooleanOptionalAction,
                   default=None, help="reuse the KV blocks of prompt prefixes computed before (default: on, as vLLM); "
                   "--no-enable-prefix-caching computes every prompt whole")
    p.add_argument("--enable-chunked-prefill", dest="enable_chunked_prefill", action=argparse.BooleanOptionalAction,
                   default=None, help="split prompts over steps within --max-num-batched-tokens (default: on); "
                   "--no-enable-chunked-prefill schedules whole prompts only")
    p.add_argument("--long-prefill-token-threshold-adaptive", dest="long_prefill_token_threshold_adaptive",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="floor --long-prefill-token-threshold at --max-num-batched-tokens / requests (vLLM's)")
    p.add_argument("--enable-log-requests", dest="enable_log_requests", action=argparse.BooleanOptionalAction,
                   default=False, help="log every request (id, DP rank, prompt tokens, sampling parameters)")
    p.add_argument("--disable-log-requests", action="store_true", help="accepted (older vLLM spelling); no effect")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action=argparse.BooleanOptionalAction,
                   default=False, help="accepted; no effect (the engine runs no code from the model directory)")
    p.add_argument("--enable-eplb", action="store_true")
    p.add_argument("--eplb-config", default=None, help="JSON object (window_size, step_interval, num_redundant_experts, ...)")
    p.add_argument("--kv-transfer-config", default=None,
                   help="JSON object as for vLLM, e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}': "
                   "disaggregated prefill/decode with NixlConnector's protocol (docs/engine.md)")
    p.add_argument("--profiler-config", default=None,
                   help="JSON object as for vLLM, e.g. '{\"profiler\":\"torch\",\"torch_profiler_dir\":\"/abs/dir\"}': "
                   "adds POST /start_profile and /stop_profile; each DP rank writes a torch-profiler trace of its steps "
                   "(docs/engine.md)")
    p.add_argument("--hf-overrides", default=None,
                   help="JSON object merged into the model's config.json (e.g. '{\"router_skew\": 3.0}' for a skewed router)")
    p.add_argument("--write-model-dir", metavar="DIR", default=None,
                   help="write config.json + tokenizer files for the model to DIR (for clients such as `vllm bench serve`) and exit")
    p.add_argument("--startup-timeout", dest="startup_timeout_s", type=float, default=None)
    p.add_argument("--check-args", action="store_true",
                   help="check the command as at start (flags, their values, the EPKIT_* environment, the all2all "
                   "backend on this machine) and exit: 0 and nothing printed if it would start, 2 and the message if "
                   "not; starts nothing (checks that need the model's weights still happen at start)")
    return p


def _dotted(argv: list[str], flag: str) -> tuple[list[str], dict]:
    """Pull ``FLAG.KEY VALUE`` (or ``FLAG.KEY=VALUE``) pairs out of argv (vLLM's per-key spelling of a config flag)."""
    rest, extra = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(flag + "."):
            key, _, value = arg[len(flag) + 1:].partition("=")
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            try:
                extra[key] = json.loads(value)
            except json.JSONDecodeError:
                extra[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, extra


def config_from_args(argv: list[str]):
    """Parse ``epkit serve`` arguments into an :class:`EngineConfig` (raises EngineError on bad values).

    Returns ``(config, write_model_dir)``."""
    cfg, args = _parse(argv)
    return cfg, args.write_model_dir


def _parse(argv: list[str]):
    from epkit.engine.config import EngineConfig

    argv, dotted = _dotted(argv, "--eplb-config")
    argv, profiler_dotted = _dotted(argv, "--profiler-config")
    args = build_parser().parse_args(argv)
    values = {name: getattr(args, name) for name in FLAG_FIELDS.values() if getattr(args, name) is not None}
    model = args.model_flag or args.model
    if model:
        values["model"] = model
    eplb = _json_object("--eplb-config", args.eplb_config) if args.eplb_config else {}
    eplb.update(dotted)
    if args.hf_overrides:
        values["hf_overrides"] = _json_object("--hf-overrides", args.hf_overrides)
    if args.kv_transfer_config:
        values["kv_transfer_config"] = _json_object("--kv-transfer-config", args.kv_transfer_config)
    if args.profiler_config or profiler_dotted:
        profiler = _json_object("--profiler-config", args.profiler_config) if args.profiler_config else {}
        values["profiler_config"] = {**profiler, **profiler_dotted}
    if args.startup_timeout_s is not None:
        values["startup_timeout_s"] = args.startup_timeout_s
    if args.enable_chunked_prefill is not None:
        values["enable_chunked_prefill"] = args.enable_chunked_prefill
    if args.enable_prefix_caching is not None:
        values["enable_prefix_caching"] = args.enable_prefix_caching
    if args.long_prefill_token_threshold_adaptive is not None:
        values["long_prefill_token_threshold_adaptive"] = args.long_prefill_token_threshold_adaptive
    return EngineConfig(
        **values,
        enable_expert_parallel=args.enable_expert_parallel,
        headless=args.headless,
        enforce_eager=args.enforce_eager,
        enable_eplb=args.enable_eplb,
        eplb_config=eplb,
        enable_log_requests=args.enable_log_requests,
    ), args


def no_effect_flags(argv: list[str]) -> list[str]:
    """The ``vllm serve`` flags in ``argv`` that the built-in engine accepts but does not act on."""
    given = {arg.split("=", 1)[0] for arg in argv}
    return [flag for flag in NO_EFFECT if flag in given]


def check_args(cfg) -> None:
    """The start-up checks that need neither the model nor torch: raises :class:`EngineError` (``--check-args``)."""
    from epkit.engine.all2all import check_backend  # torch-free at import
    from epkit.engine.config import check_environment

    check_environment()
    if cfg.ep_size > 1:
        check_backend(cfg.all2all_backend)
    if cfg.kv_transfer_config is not None:
        from epkit.engine.kv_transfer import hold_timeout_s, side_channel_address

        side_channel_address(cfg.data_parallel_size - 1)
        hold_timeout_s(cfg.kv_transfer_config)


def main(argv: list[str]) -> int:
    """Entry point of ``epkit serve ARGS``; returns the process exit code."""
    try:
        cfg, args = _parse(list(argv))
        if args.check_args:  # before logging is set up: nothing on stdout or stderr unless it fails
            check_args(cfg)
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [epkit serve] %(levelname)s %(message)s")
        model_dir = args.write_model_dir
        from epkit.engine.config import check_environment

        for note in check_environment():
            logging.warning("%s", note)
        ignored = no_effect_flags(list(argv))
        if ignored:
            logging.warning("accepted for `vllm serve` compatibility, no effect in the built-in engine: %s",
                            "; ".join(f"{flag} ({NO_EFFECT[flag]})" for flag in ignored))
        if model_dir:
            from epkit.engine.model import model_config_of
            from epkit.engine.tokenizer import write_model_dir

            config, _ = model_config_of(cfg)
            print(write_model_dir(config, model_dir))
            return 0
        from epkit.engine.launcher import serve

        return serve(cfg)
    except EngineError as exc:
        print(f"epkit serve: error: {exc}", file=sys.stderr)
        return 2



def _batch_default(name: str) -> str:
    """The help's default of --max-num-seqs / --max-num-batched-tokens, from config.BATCH_DEFAULTS."""
    from epkit.engine.config import BATCH_DEFAULTS

    i = ("max_num_seqs", "max_num_batched_tokens").index(name)
    return ("vLLM's for the device: " + ", ".join(f"{values[i]} on a {where}" if "GPU" in where else f"{values[i]} on {where}"
                                                   for where, values in BATCH_DEFAULTS.items())
            + " (a large GPU: >= 70 GiB, not an A100)")


def _json_object(flag: str, text: str) -> dict:
    """A flag's value that must be a JSON object (vLLM's --eplb-config, --hf-overrides)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise EngineError(f"{flag} must be a JSON object, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
