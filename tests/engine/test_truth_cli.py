"""The built-in engine tells the truth at start (issue 15, section 4): no random weights where vLLM fails, the
`vllm serve` flags a user pastes, unknown flags, and the EPKIT_* environment variables (checked, documented)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from truth_model import CONFIG

from epkit.engine.cli import config_from_args, no_effect_flags
from epkit.engine.config import ENV_VARS, EngineConfig, EnvVarError, check_environment, env_value
from epkit.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "epkit.engine.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def model_dir(tmp_path: Path, *files: str) -> Path:
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": 2}))
    for name in files:
        (d / name).write_bytes(b"")
    return d


def test_a_folder_without_weights_is_refused_not_served_random(tmp_path):
    """vLLM fails on a model folder without weight files; so does `epkit serve` (auto and safetensors), with one
    message naming the folder and the way to ask for random weights - never a random-weight server."""
    d = model_dir(tmp_path)
    r = serve(str(d), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "holds no weight files (*.safetensors)" in r.stderr and "--load-format dummy" in r.stderr and str(d) in r.stderr
    assert "started EngineCore" not in r.stderr  # refused before any process started

    from epkit.engine.runner import weight_source

    for fmt in ("auto", "safetensors"):
        with pytest.raises(EngineError, match=r"holds no weight files"):
            weight_source(EngineConfig(model=str(d), load_format=fmt), d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(EngineError, match=r"it holds \*\.bin files, which the built-in engine does not read"):
        weight_source(EngineConfig(model=str(d)), d)
    with pytest.raises(EngineError, match=r"'Qwen/Qwen3-30B-A3B' is a config bundled with epkit, without weights"):
        weight_source(EngineConfig(model="Qwen/Qwen3-30B-A3B"), None)
    # what is served is said: random where asked for (or epkit's own models, which have no checkpoint), else the files
    assert weight_source(EngineConfig(model=str(d), load_format="dummy", seed=5), d) == (
        None, "random (--load-format dummy, seed 5)")
    assert weight_source(EngineConfig(model="epkit-tiny-moe"), None)[1].startswith("random (seed 0): epkit-tiny-moe is one")
    (d / "model.safetensors").write_bytes(b"x" * 1024)
    source, line = weight_source(EngineConfig(model=str(d)), d)
    assert source == d and line.startswith(f"read from 1 file(s) in {d} (model.safetensors")


PASTED = ["--trust-remote-code", "--enable-chunked-prefill", "--kv-cache-dtype", "auto", "--max-num-seqs", "64",
          "--max-num-batched-tokens", "4k", "--gpu-memory-utilization", "0.85", "--seed", "7", "--disable-log-requests",
          "--uvicorn-log-level", "info", "--tokenizer", "/some/dir", "--dtype", "bfloat16"]


def test_pasted_vllm_flags_are_accepted_and_the_no_ops_named():
    cfg, _ = config_from_args(["epkit-tiny-moe", *PASTED])
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.gpu_memory_utilization, cfg.seed) == (64, 4000, 0.85, 7)
    assert (cfg.kv_cache_dtype, cfg.uvicorn_log_level, cfg.tokenizer, cfg.dtype) == ("auto", "info", "/some/dir", "bfloat16")
    assert cfg.enable_chunked_prefill and not cfg.enable_log_requests
    assert config_from_args(["m", "--max-num-batched-tokens", "8K", "--max-model-len", "2k"])[0].max_num_batched_tokens == 8192
    assert not config_from_args(["m", "--no-enable-chunked-prefill"])[0].enable_chunked_prefill
    assert config_from_args(["m", "--enable-log-requests"])[0].enable_log_requests
    assert no_effect_flags(["m", *PASTED]) == ["--trust-remote-code", "--disable-log-requests"]
    assert no_effect_flags(["m", "--no-trust-remote-code", "--seed", "1"]) == []
    with pytest.raises(EngineError, match=r"kv_cache_dtype='fp8': .*allowed: auto"):
        config_from_args(["m", "--kv-cache-dtype", "fp8"])
    with pytest.raises(EngineError, match=r"uvicorn_log_level='loud'; allowed: critical, error, warning, info, debug, trace"):
        config_from_args(["m", "--uvicorn-log-level", "loud"])


def test_unknown_flags_still_fail_with_argparses_message():
    r = serve("epkit-tiny-moe", "--bogus-flag", "1")
    assert r.returncode == 2 and "epkit serve: error: unrecognized arguments: --bogus-flag 1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = serve("epkit-tiny-moe", "--max-num-batched-tokens", "lots")
    assert r.returncode == 2 and "--max-num-batched-tokens: invalid integer 'lots'" in r.stderr, r.stderr


def _processes_naming(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_check_args_checks_the_command_as_at_start_and_starts_nothing():
    """`epkit serve ... --check-args` (what `epkit sweep` runs for each topology): exit 0 and silence for a command
    that would start, exit 2 and one `epkit serve: error:` line naming the field for one that would not; no
    server, no engine, no process left, and no torch imported on the way."""
    import socket
    import uuid

    marker = f"check-args-{uuid.uuid4().hex[:8]}"
    with socket.socket() as s:  # a port that was free a moment ago: the check must not take it
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    good = ["epkit-tiny-moe", "--served-model-name", marker, "--port", port, "-dp", "2", "--enable-expert-parallel",
            "--all2all-backend", "all_to_all", "--eplb-config.num_redundant_experts", "2", *PASTED]
    r = serve(*good, "--check-args")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(port)))  # nothing listens there
    assert _processes_naming(marker) == []

    bad = [  # (flags, environment, what the one message must say)
        (["-dp", "2", "--enable-expert-parallel", "--all2all-backend", "deepep_low_latency"], {},
         "--all2all-backend deepep_low_latency needs the DeepEP package (Python module 'deep_ep')"),
        (["-tp", "2"], {}, "tensor_parallel_size=2: the built-in engine supports only 1"),
        (["--all2all-backend", "fastest"], {}, "all2all_backend='fastest'; allowed: allgather_reducescatter"),
        (["--max-num-seqs", "0"], {}, "max_num_seqs=0 must be an integer >= 1"),
        (["--eplb-config", "[1]"], {}, "--eplb-config must be a JSON object"),
        (["--bogus-flag"], {}, "epkit serve: error: unrecognized arguments: --bogus-flag"),
        ([], {"EPKIT_CUDA_GRAPHS": "on"}, "EPKIT_CUDA_GRAPHS='on': expected auto, emulate or off"),
    ]
    for flags, env, message in bad:
        r = serve("epkit-tiny-moe", "--served-model-name", marker, "--port", port, *flags, "--check-args", env=env)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, (flags, r.stderr)
        assert lines[-1].startswith("epkit serve: error: ") and message in lines[-1], (flags, r.stderr)
        assert all(line.startswith("usage:") or line.startswith(" ") for line in lines[:-1]), r.stderr  # argparse's usage only
    assert _processes_naming(marker) == []

    code = ("import sys; from epkit.engine.cli import main; "
            f"rc = main({good!r} + ['--check-args']); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["0", "False"], r.stdout + r.stderr


def test_environment_variables_are_checked_at_start_and_renamed_with_a_deprecation():
    for env, message in [({"EPKIT_CUDA_GRAPHS": "on"}, "EPKIT_CUDA_GRAPHS='on': expected auto, emulate or off"),
                         ({"EPKIT_CPU_THREADS": "0"}, "EPKIT_CPU_THREADS='0': expected an integer >= 1"),
                         ({"EPKIT_FUSED_KERNELS": "0"}, "EPKIT_FUSED_KERNELS='0': expected auto or torch"),
                         ({"EPKIT_FUSED_NORMS": "off"}, "EPKIT_FUSED_NORMS='off': expected 1 or 0"),
                         ({"EPKIT_DECODE_GRAPHS": "cuda"}, "EPKIT_DECODE_GRAPHS='cuda': expected auto, emulate or off"),
                         ({"EPKIT_FUSED_NORMS": "0", "EPKIT_FUSED_KERNELS": "auto"}, "disagree; set only EPKIT_FUSED_KERNELS")]:
        with pytest.raises(EnvVarError) as info:
            check_environment(env)
        assert message in str(info.value)
    # the former names still work, with one warning each; a near-miss name is pointed out
    notes = check_environment({"EPKIT_FUSED_NORMS": "0", "EPKIT_DECODE_GRAPHS": "emulate", "EPKIT_MOE_GEM": "torch"})
    assert env_value("EPKIT_FUSED_KERNELS", {"EPKIT_FUSED_NORMS": "0"}) == "torch"
    assert env_value("EPKIT_CUDA_GRAPHS", {"EPKIT_DECODE_GRAPHS": "emulate"}) == "emulate"
    assert notes == ["EPKIT_MOE_GEM is not read by the engine; did you mean EPKIT_MOE_GEMM?",
                     "EPKIT_FUSED_NORMS is deprecated; use EPKIT_FUSED_KERNELS=torch (same effect)",
                     "EPKIT_DECODE_GRAPHS is deprecated; use EPKIT_CUDA_GRAPHS=emulate (same effect)"]
    assert check_environment({"EPKIT_DEPLOYMENT_ID": "x", "EPKIT_VLLM_PYTHON": "y"}) == []
    r = serve("epkit-tiny-moe", env={"EPKIT_CUDA_GRAPHS": "on"})
    assert r.returncode == 2 and "epkit serve: error: EPKIT_CUDA_GRAPHS='on': expected auto, emulate or off" in r.stderr
    assert "Traceback" not in r.stderr


# Where EPKIT_* names are read or set: the package, and what runs around it (shell scripts, CI, tests, notebooks).
ENV_SCANNED = ("epkit", "scripts", ".ci", "tests", "notebooks", "benchmarks")
# EPKIT_* words there that are not environment variables: a Python constant, and the misspellings that show
# check_environment's "did you mean" (a test feeds one; config.py's docstring names the other).
NOT_ENV_VARS = {"EPKIT_ONLY_BACKENDS", "EPKIT_MOE_GEM", "EPKIT_FUSED_KERNEL"}


def test_every_epkit_environment_variable_is_documented():
    """Every EPKIT_* name in epkit/, scripts/, .ci/, tests/, notebooks/ and benchmarks/ (Python, shell, notebook
    JSON alike) has a row in one of docs/engine.md's two tables, and every row names a variable still in use."""
    names = set()
    for folder in ENV_SCANNED:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                names.update(re.findall(r"\b(EPKIT_[A-Z0-9_]*[A-Z0-9])\b", path.read_text(errors="ignore")))
    assert NOT_ENV_VARS <= names, "stale NOT_ENV_VARS entries"
    names -= NOT_ENV_VARS
    names |= set(ENV_VARS) | {v.old_name for v in ENV_VARS.values() if v.old_name}
    rows = set(re.findall(r"^\| `(EPKIT_[A-Z0-9_]+)`", (ROOT / "docs/engine.md").read_text(), re.M))
    assert names <= rows, f"undocumented in docs/engine.md: {sorted(names - rows)}"
    assert rows <= names, f"documented in docs/engine.md but used nowhere: {sorted(rows - names)}"
    assert {"EPKIT_FUSED_KERNELS", "EPKIT_CPU_THREADS", "EPKIT_VLLM_PYTHON", "EPKIT_VENV", "EPKIT_SWEEP_ONLY",
            "EPKIT_SLURM", "EPKIT_RESULTS"} <= names  # the scan reaches the engine, scripts, tests and notebooks


def test_without_chunked_prefill_prompts_are_admitted_whole():
    from epkit.engine.block_manager import BlockManager
    from epkit.engine.scheduler import Scheduler, SchedulerConfig
    from epkit.engine.sequence import EngineRequest, SamplingParams

    def scheduler(chunked: bool) -> Scheduler:
        s = Scheduler(SchedulerConfig(8, 10, 64, 1, chunked_prefill=chunked), BlockManager(32, 4))
        for rid, n in (("a", 6), ("b", 7)):
            s.add(EngineRequest(rid, tuple(range(3, 3 + n)), SamplingParams(max_tokens=2)))
        return s

    assert [(q.request_id, n) for q, n in scheduler(True).schedule()] == [("a", 6), ("b", 4)]  # b chunked
    whole = scheduler(False)
    assert [(q.request_id, n) for q, n in whole.schedule()] == [("a", 6)]  # b waits for a step with room
    whole.postprocess([(whole.running[0], 6)], {"a": 9})
    assert [(q.request_id, n) for q, n in whole.schedule()] == [("a", 1), ("b", 7)]
