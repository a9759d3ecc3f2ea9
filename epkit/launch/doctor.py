"""``epkit doctor``: preflight checks for an EP deployment on this node.

GPUs and their memory, NVLink/PCIe topology (``nvidia-smi topo -m``), network interfaces
and which one Gloo and NCCL would pick, free ports, the installed vLLM and the all2all
backends it accepts, and the seed's prerequisites (DeepEP, pplx-kernels, DeepGEMM,
FlashInfer, NIXL/UCX, gdrcopy, NVSHMEM), each with its install hint when missing. Which
kernels are required follows the target vLLM release (``--vllm-version``: by default the
installed one, else epkit's default) and ``--all2all-backend``: pplx-kernels is never asked
for where that release replaces pplx. It exits 1 when any required check fails, so it can
gate a script. The Slurm executor runs :func:`collect` inside every node task before the
engine starts and stores the result with the point.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from epkit.errors import TopologyError
from epkit.vllm import versions as vllm_versions

EP_KERNELS = "vLLM's tools/ep_kernels scripts"
# prerequisite -> (python modules, shared libraries / devices, install hint from the seed)
PREREQUISITES = {
    "DeepEP": (("deep_ep",), (), f"install DeepEP with {EP_KERNELS} (needed by the deepep_* backends)"),
    "pplx-kernels": (("pplx_kernels",), (), f"install with {EP_KERNELS} (needed by the pplx backend)"),
    "DeepGEMM": (("deep_gemm",), (), "follow https://github.com/deepseek-ai/DeepGEMM#installation "
                 "(FP8 grouped GEMMs of DeepSeek-style models)"),
    "FlashInfer": (("flashinfer",), (), "pip install flashinfer-python (the flashinfer_* backends, MNNVL systems)"),
    "NIXL": (("nixl",), (), "pip install nixl (brings UCX); for disaggregated serving (NixlConnector) and nixl_ep"),
    "UCX": (("ucxx", "ucp"), ("ucp",), "installed with `pip install nixl`, or your distribution's ucx packages"),
    "gdrcopy": ((), ("gdrapi", "/dev/gdrdrv"), "run vLLM's tools/install_gdrcopy.sh "
                "(e.g. install_gdrcopy.sh \"${GDRCOPY_OS_VERSION}\" \"12.8\" \"x64\"); optional, faster NIXL"),
    "NVSHMEM": (("nvshmem",), ("nvshmem_host", "nvshmem"), f"installed by {EP_KERNELS} "
                "(DeepEP needs it), or pip install nvidia-nvshmem-cu12"),
}
# all2all backend (prefix) -> the prerequisites it cannot run without
BACKEND_NEEDS = {
    "deepep_": ("DeepEP", "NVSHMEM"),
    "pplx": ("pplx-kernels", "NVSHMEM"),
    "flashinfer_": ("FlashInfer",),
    "nixl_ep": ("NIXL",),
}
# required when no --all2all-backend is given: the seed's prerequisites 1 and 2 (DeepEP and pplx-kernels
# where the release runs pplx, DeepGEMM); the rest is reported but optional
SEED_REQUIRED = ("DeepEP", "NVSHMEM", "pplx-kernels", "DeepGEMM")
DEFAULT_PORTS = (8000, 13345, 29500, 29550)


def _run(argv: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def check_gpus() -> dict:
    """GPUs (name, memory) from nvidia-smi, and the interconnect matrix."""
    out = _run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"])
    if out is None:
        return {"ok": False, "gpus": [], "topo": None,
                "hint": "nvidia-smi not found or failed: no NVIDIA GPU/driver here (the built-in engine runs on CPU)",
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    gpus = []
    for line in out.strip().splitlines():
        idx, name, mem = [p.strip() for p in line.split(",")]
        gpus.append({"index": int(idx), "name": name, "memory_mib": int(float(mem))})
    return {"ok": bool(gpus), "gpus": gpus, "topo": _run(["nvidia-smi", "topo", "-m"]),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def interfaces() -> list[dict]:
    """Network interfaces with their IPv4 addresses (from ``ip -o -4 addr``, else /sys/class/net)."""
    out = _run(["ip", "-o", "-4", "addr", "show"])
    found: dict[str, dict] = {}
    if out:
        for line in out.splitlines():
            parts = line.split()
            name, addr = parts[1], parts[3].split("/")[0]
            found.setdefault(name, {"name": name, "ipv4": []})["ipv4"].append(addr)
    for p in sorted(Path("/sys/class/net").glob("*")) if Path("/sys/class/net").exists() else []:
        entry = found.setdefault(p.name, {"name": p.name, "ipv4": []})
        entry["infiniband"] = (p / "device" / "infiniband").exists() or p.name.startswith("ib")
        try:
            entry["up"] = (p / "operstate").read_text().strip() in ("up", "unknown")
        except OSError:
            entry["up"] = None
    return list(found.values())


def _nccl_choice(ifaces: list[dict]) -> str | None:
    """NCCL's default socket interface: an ib* one first, then any but lo/docker."""
    names = [i["name"] for i in ifaces if i.get("ipv4") and i.get("up", True) is not False]
    for prefix in ("ib",):
        for n in names:
            if n.startswith(prefix):
                return n
    rest = [n for n in names if n != "lo" and not n.startswith(("docker", "veth"))]
    return rest[0] if rest else ("lo" if "lo" in names else None)


def check_network() -> dict:
    """Interfaces and which one Gloo and NCCL would use (their env variables first)."""
    ifaces = interfaces()
    host = socket.gethostname()
    try:
        host_ip = socket.gethostbyname(host)
    except OSError:
        host_ip = None
    by_ip = next((i["name"] for i in ifaces if host_ip in i.get("ipv4", [])), None)
    gloo_env, nccl_env = os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME")
    gloo = gloo_env or by_ip  # Gloo binds to the address the hostname resolves to
    nccl = nccl_env or _nccl_choice(ifaces)
    notes = []
    if any(i.get("infiniband") for i in ifaces) and not gloo_env:
        notes.append("InfiniBand present and GLOO_SOCKET_IFNAME unset: set it to the Ethernet interface "
                     "(e.g. export GLOO_SOCKET_IFNAME=eth0) to avoid start-up hangs (seed)")
    if host_ip and host_ip.startswith("127.") and not gloo_env:
        notes.append(f"the hostname {host} resolves to {host_ip}: other nodes cannot reach Gloo there; "
                     "set GLOO_SOCKET_IFNAME")
    return {"ok": bool(gloo or nccl), "hostname": host, "hostname_ip": host_ip, "interfaces": ifaces,
            "gloo_socket_ifname": gloo, "gloo_from_env": gloo_env is not None, "nccl_socket_ifname": nccl,
            "nccl_from_env": nccl_env is not None, "notes": notes}


def check_ports(ports) -> dict:
    """Which of ``ports`` are free to listen on here."""
    result = {}
    for port in sorted({int(p) for p in ports if p}):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
                result[str(port)] = True
            except OSError:
                result[str(port)] = False
    return {"ok": all(result.values()), "free": result}


def installed_vllm() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_vllm(target: str | None = None) -> dict:
    """The installed vLLM and the all2all backends its release accepts (from epkit.vllm.versions);
    with a ``target`` release, a different installed one fails the check."""
    version = installed_vllm()
    if version is None:
        rel = vllm_versions.release(target or vllm_versions.DEFAULT_VLLM_VERSION)
        return {"ok": False, "version": None, "backends": None,
                "hint": f"vLLM is not installed here: pip install vllm=={target or rel.version} "
                        f"(its --all2all-backend values: {', '.join(sorted(rel.backends))})"}
    try:
        rel = vllm_versions.release(version.split("+")[0])
    except TopologyError as exc:  # a release epkit's table does not know
        return {"ok": target is None, "version": version, "backends": None, "note": str(exc)}
    out = {"ok": True, "version": version, "backends": sorted(rel.backends)}
    if target is not None and version.split("+")[0] != target:
        out.update(ok=False, hint=f"the target is vLLM {target} but {version} is installed: "
                                  f"pip install vllm=={target}, or pass --vllm-version {version.split('+')[0]}")
    return out


def required_prerequisites(target: str, backend: str | None) -> dict[str, str]:
    """Prerequisite -> why it is required, for vLLM ``target`` and (if given) ``backend``.

    Without a backend, the seed's prerequisites for every backend the release really runs. Kernels
    of a backend the release replaces with another are not required (pplx from 0.17.0).
    """
    rel = vllm_versions.release(target)
    runs = {b for b in rel.backends if b not in rel.replaced}
    backends = [rel.replaced.get(backend, backend)] if backend else sorted(runs)
    users: dict[str, list[str]] = {}
    for b in backends:
        for prefix, names in BACKEND_NEEDS.items():
            if b.startswith(prefix):
                for name in names:
                    users.setdefault(name, []).append(b)
    if not backend:
        users = {n: b for n, b in users.items() if n in SEED_REQUIRED}
    needed = {n: f"{', '.join(b)} on vLLM {rel.version}" for n, b in users.items()}
    if not backend:
        needed["DeepGEMM"] = "the seed's prerequisites"
    return needed


def not_needed_note(name: str, target: str) -> str | None:
    """Why a prerequisite is of no use on ``target`` (its backend is replaced there), else None."""
    rel = vllm_versions.release(target)
    for prefix, names in BACKEND_NEEDS.items():
        if name in names and name != "NVSHMEM":
            users = [b for b in sorted(rel.backends) if b.startswith(prefix)]
            if users and all(b in rel.replaced for b in users):
                since = min((r for r in vllm_versions.RELEASES.values() if users[0] in r.replaced),
                            key=vllm_versions.VllmRelease.key).version
                return (f"not needed: vLLM {rel.version} accepts {', '.join(users)} but runs "
                        f"{rel.replaced[users[0]]} instead (since vLLM {since})")
    return None


def check_prerequisites(target: str | None = None, backend: str | None = None) -> dict:
    target = target or vllm_versions.DEFAULT_VLLM_VERSION
    required = required_prerequisites(target, backend)
    out = {}
    for name, (modules, libs, hint) in PREREQUISITES.items():
        found = [m for m in modules if importlib.util.find_spec(m) is not None]
        libs_found = [lib for lib in libs if (Path(lib).exists() if lib.startswith("/") else ctypes.util.find_library(lib))]
        present = bool(found or libs_found)
        entry = {"ok": present or name not in required, "present": present, "required": name in required,
                 "found": found + libs_found}
        if name in required:
            entry["why"] = required[name]
        note = not_needed_note(name, target)
        if not present:
            entry["hint"] = note or hint
        out[name] = entry
    return out


def collect(ports=DEFAULT_PORTS, vllm_version: str | None = None, backend: str | None = None) -> dict:
    """Every check, as plain data (stored with each Slurm point). ``vllm_version`` is the target
    release (default: the installed vLLM, else epkit's default); ``backend`` narrows the kernels."""
    target = vllm_version or (installed_vllm() or "").split("+")[0] or vllm_versions.DEFAULT_VLLM_VERSION
    try:
        vllm_versions.release(target)
    except TopologyError:
        target = vllm_versions.DEFAULT_VLLM_VERSION  # an installed release newer than epkit's table
    checks = {"host": socket.gethostname(), "python": sys.version.split()[0],
              "target": {"vllm_version": target, "all2all_backend": backend,
                         "runs": vllm_versions.release(target).replaced.get(backend, backend) if backend else None},
              "gpus": check_gpus(), "network": check_network(), "ports": check_ports(ports),
              "vllm": check_vllm(vllm_version), "prerequisites": check_prerequisites(target, backend)}
    checks["failed"] = failed(checks)
    checks["ok"] = not checks["failed"]
    return checks


def failed(checks: dict) -> list[str]:
    """Names of the checks that failed (a missing optional prerequisite is not a failure)."""
    out = [name for name in ("gpus", "network", "ports", "vllm") if not checks[name]["ok"]]
    return out + [name for name, c in checks["prerequisites"].items() if not c["ok"]]


def report(checks: dict) -> str:
    """The checks as lines a user reads."""
    mark = {True: "ok  ", False: "MISS"}
    lines = [f"epkit doctor on {checks['host']} (python {checks['python']})"]
    g = checks["gpus"]
    lines.append(f"[{mark[g['ok']]}] GPUs: " + (", ".join(f"{x['index']}: {x['name']} {x['memory_mib']} MiB"
                                                       for x in g["gpus"]) or g.get("hint", "none")))
    if g.get("topo"):
        lines.append("       nvidia-smi topo -m:\n" + "\n".join("         " + ln for ln in g["topo"].splitlines()))
    n = checks["network"]
    lines.append(f"[{mark[n['ok']]}] network: " + ", ".join(
        f"{i['name']}({','.join(i.get('ipv4', [])) or '-'}{', IB' if i.get('infiniband') else ''})" for i in n["interfaces"]))
    lines.append(f"       Gloo would use {n['gloo_socket_ifname']} ({'GLOO_SOCKET_IFNAME' if n['gloo_from_env'] else 'hostname ' + str(n['hostname']) + ' -> ' + str(n['hostname_ip'])}); "
                 f"NCCL would use {n['nccl_socket_ifname']} ({'NCCL_SOCKET_IFNAME' if n['nccl_from_env'] else 'default order'})")
    lines += [f"       note: {x}" for x in n["notes"]]
    p = checks["ports"]
    lines.append(f"[{mark[p['ok']]}] ports: " + ", ".join(f"{k} {'free' if v else 'IN USE'}" for k, v in p["free"].items()))
    v = checks["vllm"]
    lines.append(f"[{mark[v['ok']]}] vLLM: " + (f"{v['version']}, backends: {', '.join(v['backends'] or []) or '?'}"
                                               if v["version"] else v["hint"]))
    for name, c in checks["prerequisites"].items():
        status = "ok  " if c["present"] else ("MISS" if c["required"] else "opt ")
        if c["present"]:
            text = ", ".join(c["found"])
        else:
            text = (f"required for {c['why']}: " if c["required"] else "") + c["hint"]
        lines.append(f"[{status}] {name}: {text}")
    target = checks.get("target", {})
    bad = checks.get("failed", failed(checks))
    goal = f"vLLM {target.get('vllm_version')}" + (f", {target['all2all_backend']}" if target.get("all2all_backend") else "")
    if target.get("runs") and target["runs"] != target.get("all2all_backend"):
        lines.append(f"note: vLLM {target['vllm_version']} accepts {target['all2all_backend']} but runs "
                     f"{target['runs']} instead; its kernels are the ones checked")
    lines.append(f"{len(bad)} check(s) failed for {goal}: {', '.join(bad)}" if bad else f"every check passed for {goal}")
    return "\n".join(lines)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not an integer in 1-65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1-65535")
    return port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epkit doctor", description=__doc__.split("\n\n")[0],
                                 epilog="Exit status: 0 every required check passed, 1 one failed, 2 bad flags. "
                                        "Missing optional prerequisites (marked opt) do not fail.")
    ap.add_argument("--ports", type=_port, nargs="*", default=list(DEFAULT_PORTS), metavar="PORT",
                    help=f"ports that must be free (default: {' '.join(map(str, DEFAULT_PORTS))})")
    ap.add_argument("--vllm-version", metavar="VERSION",
                    help="the vLLM release the deployment targets; decides which kernels are required "
                         "(default: the installed vLLM, else %s)" % vllm_versions.DEFAULT_VLLM_VERSION)
    ap.add_argument("--all2all-backend", metavar="BACKEND",
                    help="the backend the deployment uses: require only its kernels (default: the seed's "
                         "prerequisites for the target release)")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    try:
        target = args.vllm_version or (installed_vllm() or "").split("+")[0] or vllm_versions.DEFAULT_VLLM_VERSION
        rel = vllm_versions.release(target)
        if args.all2all_backend is not None and args.all2all_backend not in rel.backends:
            raise TopologyError(f"--all2all-backend {args.all2all_backend!r} is not a backend of vLLM {rel.version}; "
                                f"allowed: {', '.join(sorted(rel.backends))}")
    except TopologyError as exc:
        ap.error(str(exc))
    checks = collect(args.ports, args.vllm_version, args.all2all_backend)
    print(json.dumps(checks, indent=1) if args.json else report(checks))
    return 0 if checks["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
