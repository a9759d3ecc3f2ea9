"""The cp312 manylinux wheels a vLLM wheel needs on the device, minus what its image already has.

Walks ``Requires-Dist`` breadth-first from the vLLM wheel (markers evaluated for CPython 3.12 on
x86-64 Linux, extras followed, also when a package is met again with a new extra), skipping the
packages of the device image (``device_image_packages.txt``) and the heavy optional ones in
``SKIP`` (imported lazily; vLLM's default mode on H200 ran without them on 2026-11-27). Each
level's new packages are fetched with one ``pip download --no-deps`` call. ``PINS`` holds the versions
breadth-first choice gets wrong; after the walk every requirement edge is checked against the
chosen versions and any conflict fails the run, naming both ends.

    python resolve_wheels.py 0.26.0 WORK --lock wheels_cp312.lock       # fetch vllm and the locked set
    python resolve_wheels.py 0.26.0 WORK --lock-out wheels_cp312.lock   # walk the graph, write the lock
    python resolve_wheels.py --platform-args                            # pip's target flags, one line

The vLLM wheel lands in ``WORK/vllm/``, its dependencies in ``WORK/wheels/``.

Any Python with pip and ``packaging`` runs it; the wheels are chosen for the device, not for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent

# Hard requirements of vllm 0.26.0 that the benchmark never imports (video decoding, FlashInfer,
# Blackwell/TileLang kernels, fast safetensors loading) and that would add > 1 GB.
SKIP = {canonicalize_name(n) for n in (
    "torchcodec", "PyNvVideoCodec", "tilelang", "humming-kernels", "tokenspeed-mla", "quack-kernels",
    "nvidia-cutlass-dsl", "fastsafetensors", "flashinfer-python", "nvidia-cudnn-frontend")}
# Breadth-first takes the newest release; these need an older one.
PINS = {
    # xgrammar 0.2.8 needs apache-tvm-ffi>=0.1.11, vllm 0.26.0 pins apache-tvm-ffi==0.1.10.
    "xgrammar": "==0.2.7",
}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
       "implementation_version": "3.12.3"}


def platform_args() -> list[str]:
    """pip's target flags for the device: CPython 3.12, every manylinux x86-64 tag up to glibc 2.31."""
    # pip prefers the tags given first: newest glibc first, up to 2.31 (llguidance needs it; the
    # 2026-11-27 device runs loaded these builds; newer glibc there is likely but was not read).
    tags = [f"manylinux_2_{n}_x86_64" for n in range(31, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def device_packages() -> set[str]:
    lines = (HERE / "device_image_packages.txt").read_text().splitlines()
    return {canonicalize_name(n.strip()) for n in lines if n.strip() and not n.startswith("#")}


def requirements_of(wheel: Path, extras: set[str]) -> list[Requirement]:
    """The wheel's Requires-Dist entries that apply on the device with ``extras`` requested."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def wheel_index(wheel_dir: Path) -> dict[str, Path]:
    """Package name -> its wheel in ``wheel_dir`` (two versions of one package is an error)."""
    index: dict[str, Path] = {}
    for p in sorted(wheel_dir.glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(p.name)[0])
        if name in index:
            sys.exit(f"{wheel_dir} holds two wheels of {name}: {index[name].name}, {p.name}; empty it and re-run")
        index[name] = p
    return index


def pip_download(specs: list[str], wheel_dir: Path) -> None:
    """Fetch ``specs`` (no dependencies) into ``wheel_dir``; one call, or one per spec on failure."""
    if not specs:
        return
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *platform_args(), "-d", str(wheel_dir)]
    if subprocess.run(cmd + specs, capture_output=True, text=True).returncode == 0:
        return
    failed = []
    for spec in specs:
        p = subprocess.run(cmd + [spec], capture_output=True, text=True)
        if p.returncode != 0:
            failed.append(f"{spec}: {p.stderr.strip().splitlines()[-1:]}")
    if failed:
        sys.exit("pip download failed for:\n  " + "\n  ".join(failed))


def resolve(vllm_wheel: Path, wheel_dir: Path) -> dict[str, Path]:
    """Walk the requirement graph from ``vllm_wheel``; return the chosen wheel of every package."""
    skip = device_packages() | SKIP
    extras_done: dict[str, set[str]] = {}
    edges: list[tuple[str, Requirement]] = []
    frontier = [("vllm", r) for r in requirements_of(vllm_wheel, set())]
    while frontier:
        todo: dict[str, set[str]] = {}
        specs: dict[str, str] = {}
        for parent, req in frontier:
            name = canonicalize_name(req.name)
            edges.append((parent, req))
            if name in skip:
                continue
            new = set(req.extras) | {""}
            if new <= extras_done.get(name, set()):
                continue
            todo.setdefault(name, set()).update(new - extras_done.get(name, set()))
            extras_done.setdefault(name, set()).update(new)
            specs.setdefault(name, req.name + PINS.get(name, str(req.specifier)))
        have = wheel_index(wheel_dir)
        missing = [spec for name, spec in specs.items() if name not in have]
        if missing:
            pip_download(missing, wheel_dir)
            have = wheel_index(wheel_dir)
        frontier = [(name, r) for name, extras in todo.items() for r in requirements_of(have[name], extras - {""})]
        if not frontier:
            break
    chosen = {n: p for n, p in wheel_index(wheel_dir).items() if n in extras_done}
    conflicts = []
    for parent, req in edges:
        name = canonicalize_name(req.name)
        if name in chosen:
            version = parse_wheel_filename(chosen[name].name)[1]
            if not req.specifier.contains(version, prereleases=True):
                conflicts.append(f"{parent} needs {req}, chosen {name} {version}")
    if conflicts:
        sys.exit("version conflicts (add a pin to PINS):\n  " + "\n  ".join(sorted(set(conflicts))))
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vllm_version", nargs="?")
    ap.add_argument("work", nargs="?", type=Path)
    ap.add_argument("--lock", type=Path, help="fetch exactly the name==version lines of this file instead of resolving")
    ap.add_argument("--lock-out", type=Path, help="write the resolved set as name==version lines")
    ap.add_argument("--platform-args", action="store_true", help="print pip's target flags and exit")
    args = ap.parse_args()
    if args.platform_args:
        print(" ".join(platform_args()))
        return
    if not args.vllm_version or not args.work:
        ap.error("VLLM_VERSION and WORK are required")
    vllm_dir, wheel_dir = args.work / "vllm", args.work / "wheels"
    vllm_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if "vllm" not in wheel_index(vllm_dir):
        pip_download([f"vllm=={args.vllm_version}"], vllm_dir)
    vllm_wheel = wheel_index(vllm_dir)["vllm"]
    if parse_wheel_filename(vllm_wheel.name)[1] != Version(args.vllm_version):
        sys.exit(f"{vllm_dir} holds {vllm_wheel.name}, not vllm {args.vllm_version}; empty it and re-run")
    if args.lock:
        specs = [line.split("#")[0].strip() for line in args.lock.read_text().splitlines()]
        wanted = {canonicalize_name(Requirement(s).name): s for s in specs if s}
        have = wheel_index(wheel_dir)
        pip_download([s for n, s in wanted.items() if n not in have], wheel_dir)
        have = wheel_index(wheel_dir)
        wrong = [s for n, s in wanted.items() if n not in have
                 or parse_wheel_filename(have[n].name)[1] not in Requirement(s).specifier]
        extra = sorted(set(have) - set(wanted))
        if wrong or extra:
            sys.exit(f"{wheel_dir} does not match the lock (missing or other version: {wrong}; not in it: {extra}); "
                     "empty it and re-run")
        chosen = have
    else:
        chosen = resolve(vllm_wheel, wheel_dir)
    if args.lock_out:
        lines = [f"{parse_wheel_filename(p.name)[0]}=={parse_wheel_filename(p.name)[1]}" for p in chosen.values()]
        args.lock_out.write_text("\n".join(sorted(lines, key=str.lower)) + "\n")
    total = sum(p.stat().st_size for p in chosen.values())
    print(f"{vllm_wheel.name} ({vllm_wheel.stat().st_size / 2**20:.0f} MiB) + {len(chosen)} dependency wheels "
          f"({total / 2**20:.1f} MiB) in {args.work}")


if __name__ == "__main__":
    main()
