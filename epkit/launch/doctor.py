"""``epkit doctor``: preflight checks for an EP deployment on this node.

GPUs and their memory, NVLink/PCIe topology (``nvidia-smi topo -m``), network interfaces
and which one Gloo and NCCL would pick, free ports, the installed vLLM and the all2all
backends it accepts, and the seed's prerequisites (DeepEP, pplx-kernels, DeepGEMM,
FlashInfer, NIXL/UCX, gdrcopy, NVSHMEM), each with its install hint when missing. The
Slurm executor runs :func:`collect` inside every node task before the engine starts and
stores the result with the point.
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

# prerequisite -> (python modules, shared libraries / devices, install hint from the seed)
PREREQUISITES = {
    "DeepEP": (("deep_ep",), (), "install DeepEP and pplx-kernels with vLLM's tools/ep_kernels scripts "
               "(needed by deepep_high_throughput / deepep_low_latency)"),
    "pplx-kernels": (("pplx_kernels",), (), "install with vLLM's tools/ep_kernels scripts (needed by the pplx backend)"),
    "DeepGEMM": (("deep_gemm",), (), "follow https://github.com/deepseek-ai/DeepGEMM#installation"),
    "FlashInfer": (("flashinfer",), (), "pip install flashinfer-python (flashinfer_all2allv on MNNVL systems)"),
    "NIXL": (("nixl",), (), "pip install nixl (brings UCX); for disaggregated serving (NixlConnector)"),
    "UCX": (("ucxx", "ucp"), ("ucp",), "installed with `pip install nixl`, or your distribution's ucx packages"),
    "gdrcopy": ((), ("gdrapi", "/dev/gdrdrv"), "run vLLM's tools/install_gdrcopy.sh "
                "(e.g. install_gdrcopy.sh \"${GDRCOPY_OS_VERSION}\" \"12.8\" \"x64\"); optional, faster NIXL"),
    "NVSHMEM": (("nvshmem",), ("nvshmem_host", "nvshmem"), "installed by vLLM's tools/ep_kernels scripts "
                "(DeepEP needs it), or pip install nvidia-nvshmem-cu12"),
}
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


def check_vllm() -> dict:
    """The installed vLLM and the all2all backends its release accepts (from epkit.vllm_versions)."""
    from epkit import vllm_versions

    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        target = vllm_versions.release(vllm_versions.DEFAULT_VLLM_VERSION)
        return {"ok": False, "version": None, "backends": None,
                "hint": f"vLLM is not installed here: pip install vllm=={target.version} (epkit's default target; "
                        f"its --all2all-backend values: {', '.join(sorted(target.backends))})"}
    try:
        rel = vllm_versions.release(version.split("+")[0])
        backends = sorted(rel.backends)
    except Exception as exc:  # a release epkit's table does not know
        return {"ok": True, "version": version, "backends": None, "note": str(exc)}
    return {"ok": True, "version": version, "backends": backends}


def check_prerequisites() -> dict:
    out = {}
    for name, (modules, libs, hint) in PREREQUISITES.items():
        found = [m for m in modules if importlib.util.find_spec(m) is not None]
        libs_found = [lib for lib in libs if (Path(lib).exists() if lib.startswith("/") else ctypes.util.find_library(lib))]
        ok = bool(found or libs_found)
        out[name] = {"ok": ok, "found": found + libs_found, **({} if ok else {"hint": hint})}
    return out


def collect(ports=DEFAULT_PORTS) -> dict:
    """Every check, as plain data (stored with each Slurm point)."""
    return {"host": socket.gethostname(), "python": sys.version.split()[0], "gpus": check_gpus(),
            "network": check_network(), "ports": check_ports(ports), "vllm": check_vllm(),
            "prerequisites": check_prerequisites()}


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
        lines.append(f"[{mark[c['ok']]}] {name}: " + (", ".join(c["found"]) if c["ok"] else c["hint"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epkit doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--ports", type=int, nargs="*", default=list(DEFAULT_PORTS), help="ports that must be free")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    checks = collect(args.ports)
    print(json.dumps(checks, indent=1) if args.json else report(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
