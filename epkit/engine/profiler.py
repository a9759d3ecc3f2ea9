"""vLLM's ``--profiler-config`` for the built-in engine: a torch-profiler trace of the engine cores' steps.

``epkit serve ... --profiler-config '{"profiler": "torch", "torch_profiler_dir": "/abs/dir"}'`` adds vLLM's
``POST /start_profile`` and ``POST /stop_profile`` routes (``vllm bench serve --profile`` and ``epkit bench
--profile`` call them around a run). Between the two every DP rank records its steps with ``torch.profiler`` and
writes ``<dir>/<prefix>epkit_dp<rank>_<time>.pt.trace.json[.gz]`` (a chrome trace) and ``profiler_out_<rank>.txt`` (the
op table) when profiling stops. Each step is one ``record_function`` range named as vLLM's worker names it,
``execute_context_<prefilling requests>(<their tokens>)_generation_<decoding requests>(<their tokens>)``, so one
reader (``epkit profile``) sums the traces of both engines by step kind. ``delay_iterations`` skips that many steps
after the start; ``max_iterations`` stops (and writes) after that many recorded steps.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import Any

from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

# vLLM's ProfilerConfig fields the engine acts on, and their defaults (vLLM's).
TORCH_KEYS: dict[str, Any] = {
    "profiler": None,
    "torch_profiler_dir": "",
    "torch_profiler_activities": None,
    "torch_profiler_with_stack": True,
    "torch_profiler_with_flops": False,
    "torch_profiler_use_gzip": True,
    "torch_profiler_dump_cuda_time_total": True,
    "torch_profiler_record_shapes": False,
    "torch_profiler_with_memory": False,
    "delay_iterations": 0,
    "max_iterations": 0,
}
# vLLM's fields that shape only its own front end or schedule: accepted, no effect here.
IGNORED_KEYS = ("ignore_frontend", "detailed_trace_annotation", "capture_torch_profiler", "warmup_iterations",
                "active_iterations", "wait_iterations")
ACTIVITIES = ("CPU", "CUDA")


def check_profiler_config(value: dict) -> dict:
    """vLLM's profiler config object, checked: the torch fields with vLLM's defaults filled in; raises EngineError."""
    if not isinstance(value, dict):
        raise EngineError(f"profiler_config={value!r} must be a JSON object, e.g. "
                          '{"profiler": "torch", "torch_profiler_dir": "/abs/dir"}')
    unknown = sorted(set(value) - set(TORCH_KEYS) - set(IGNORED_KEYS))
    if unknown:
        raise EngineError(f"profiler_config has keys the built-in engine does not know: {unknown}; "
                          f"allowed: {', '.join([*TORCH_KEYS, *IGNORED_KEYS])} (vLLM's proton_* and 'cuda' profilers "
                          "are vLLM-only)")
    cfg = {**TORCH_KEYS, **{k: v for k, v in value.items() if k in TORCH_KEYS}}
    if cfg["profiler"] not in (None, "torch"):
        raise EngineError(f"profiler_config.profiler={cfg['profiler']!r}: the built-in engine has the torch profiler "
                          "only; allowed: torch (or null: off)")
    if cfg["profiler"] == "torch" and not cfg["torch_profiler_dir"]:
        raise EngineError("profiler_config.torch_profiler_dir must be set when profiler is 'torch' (as in vLLM)")
    if cfg["torch_profiler_dir"] and cfg["profiler"] != "torch":
        raise EngineError("profiler_config.torch_profiler_dir is only applicable when profiler is 'torch' (as in vLLM)")
    if cfg["torch_profiler_dir"]:
        cfg["torch_profiler_dir"] = os.path.abspath(os.path.expanduser(str(cfg["torch_profiler_dir"])))
    activities = cfg["torch_profiler_activities"]
    if activities is not None and (not isinstance(activities, list) or not activities
                                   or any(a not in ACTIVITIES for a in activities) or len(set(activities)) != len(activities)):
        raise EngineError(f"profiler_config.torch_profiler_activities={activities!r} must be a non-empty list without "
                          f"duplicates of {', '.join(ACTIVITIES)}")
    for key in ("delay_iterations", "max_iterations"):
        _check_count(f"profiler_config.{key}", cfg[key])
    for key in ("torch_profiler_with_stack", "torch_profiler_with_flops", "torch_profiler_use_gzip",
                "torch_profiler_dump_cuda_time_total", "torch_profiler_record_shapes", "torch_profiler_with_memory"):
        if not isinstance(cfg[key], bool):
            raise EngineError(f"profiler_config.{key}={cfg[key]!r} must be true or false")
    return cfg


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EngineError(f"{name}={value!r} must be an integer >= 0")


def step_annotation(batch) -> str:
    """vLLM's name for a step: its prefilling requests and their tokens, then its decoding requests and theirs."""
    ctx_reqs = ctx_tokens = gen_reqs = gen_tokens = 0
    for seq, n in batch:
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            ctx_reqs, ctx_tokens = ctx_reqs + 1, ctx_tokens + n
        else:
            gen_reqs, gen_tokens = gen_reqs + 1, gen_tokens + n
    return f"execute_context_{ctx_reqs}({ctx_tokens})_generation_{gen_reqs}({gen_tokens})"


class StepProfiler:
    """One rank's profiling sessions: ``start`` / ``stop`` from the API, ``around(batch)`` / ``after_step`` per step."""

    def __init__(self, cfg: dict, rank: int, device_type: str):
        self.cfg, self.rank, self.device_type = cfg, rank, device_type
        self.prof = None
        self.delay = 0  # steps still to skip before recording
        self.max = 0  # steps to record at most (0: until stopped)
        self.recorded = 0
        self.armed = False
        self.prefix = ""
        self.written: list[str] = []

    def start(self, overrides: dict) -> str:
        """Arm a session (``profile_prefix`` / ``delay_iterations`` / ``max_iterations`` override the config)."""
        if self.armed:
            return "already profiling"
        for key in ("delay_iterations", "max_iterations"):
            if key in overrides:
                _check_count(key, overrides[key])
        self.delay = overrides.get("delay_iterations", self.cfg["delay_iterations"])
        self.max = overrides.get("max_iterations", self.cfg["max_iterations"])
        self.prefix = str(overrides.get("profile_prefix") or "")
        self.armed, self.recorded = True, 0
        if self.delay == 0:
            self._begin()
        log.info("DP rank %d: profiler armed (delay %d steps, at most %s)", self.rank, self.delay, self.max or "no limit")
        return "started"

    def _begin(self) -> None:
        import torch

        names = self.cfg["torch_profiler_activities"] or (["CPU", "CUDA"] if self.device_type == "cuda" else ["CPU"])
        activities = [getattr(torch.profiler.ProfilerActivity, name) for name in names]
        self.prof = torch.profiler.profile(
            activities=activities, with_stack=self.cfg["torch_profiler_with_stack"],
            with_flops=self.cfg["torch_profiler_with_flops"], record_shapes=self.cfg["torch_profiler_record_shapes"],
            profile_memory=self.cfg["torch_profiler_with_memory"])
        self.prof.start()

    def around(self, batch):
        """The step's ``record_function`` range while recording, else nothing."""
        if self.prof is None:
            return nullcontext()
        import torch

        return torch.profiler.record_function(step_annotation(batch))

    def after_step(self) -> None:
        if not self.armed:
            return
        if self.prof is None:
            self.delay -= 1
            if self.delay <= 0:
                self._begin()
            return
        self.recorded += 1
        if self.max and self.recorded >= self.max:
            self.stop()

    def stop(self) -> str:
        """End the session and write its files (nothing recorded: nothing written)."""
        if not self.armed:
            return "not profiling"
        self.armed = False
        prof, self.prof = self.prof, None
        if prof is None:
            log.info("DP rank %d: profiler stopped before its delay ended: no trace", self.rank)
            return "stopped (nothing recorded)"
        prof.stop()
        os.makedirs(self.cfg["torch_profiler_dir"], exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = ".pt.trace.json.gz" if self.cfg["torch_profiler_use_gzip"] else ".pt.trace.json"
        path = os.path.join(self.cfg["torch_profiler_dir"], f"{self.prefix}epkit_dp{self.rank}_{stamp}{suffix}")
        started = time.perf_counter()
        prof.export_chrome_trace(path)
        sort = "self_cuda_time_total" if self.device_type == "cuda" and self.cfg["torch_profiler_dump_cuda_time_total"] \
            else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=60)
        with open(os.path.join(self.cfg["torch_profiler_dir"], f"{self.prefix}profiler_out_{self.rank}.txt"), "w") as fh:
            fh.write(table)
        self.written.append(path)
        log.info("DP rank %d: profiler stopped after %d steps; trace %s written in %.1f s", self.rank, self.recorded,
                 path, time.perf_counter() - started)
        return path
