"""Re-cut the chunks that ``build_payload.sh`` / ``pack_chunks.py`` made into smaller ones, without rebuilding or
recompressing: each archive is reassembled from its parts (checked against the sha256 in ``manifest.txt``), cut again
into parts of at most ``--max-mib`` and packed first-fit-decreasing into new ``.stageN/`` folders, each with the new
manifest. What a device call may carry is 64 MB in all, the working tree included, so when the tree grows the
chunks must shrink (docs/vllm_compare.md).

    python benchmarks/vllm_stage/recut_chunks.py FROM_ROOT OUT_ROOT --max-mib 26    # FROM_ROOT holds .stage1/, ...
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

MiB = 2**20


def archives(root: Path) -> list[tuple[str, bytes, str, str]]:
    """(name, whole archive bytes, sha256, MiB as listed) of every archive in the chunks under ``root``."""
    manifests = sorted(root.glob(".stage[0-9]*/manifest.txt"))
    if not manifests:
        raise SystemExit(f"{root}: no .stageN/manifest.txt")
    out = []
    for line in manifests[0].read_text().splitlines():
        name, nparts, digest, mib = line.split()
        names = [name] if nparts == "1" else [f"{name}.part{i:02d}" for i in range(int(nparts))]
        found = [next(root.glob(f".stage[0-9]*/{n}"), None) for n in names]
        missing = [n for n, f in zip(names, found) if f is None]
        if missing:
            raise SystemExit(f"{root}: missing {', '.join(missing)}")
        data = b"".join(f.read_bytes() for f in found)
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{name}: sha256 differs from the manifest's")
        out.append((name, data, digest, mib))
    return out


def recut(root: Path, out_root: Path, max_mib: float) -> list[Path]:
    limit = int(max_mib * MiB) - 64 * 1024  # room for manifest.txt, as pack_chunks.py leaves
    pieces, manifest = [], []
    for name, data, digest, mib in archives(root):
        parts = [data[i : i + limit] for i in range(0, len(data), limit)]
        manifest.append(f"{name} {len(parts)} {digest} {mib}")
        pieces += [(name if len(parts) == 1 else f"{name}.part{i:02d}", p) for i, p in enumerate(parts)]
    bins: list[list] = []
    for name, p in sorted(pieces, key=lambda t: -len(t[1])):
        target = next((b for b in bins if b[0] + len(p) <= limit), None)
        if target is None:
            target = [0, []]
            bins.append(target)
        target[0] += len(p)
        target[1].append((name, p))
    for old in out_root.glob(".stage[0-9]*"):
        shutil.rmtree(old)
    made = []
    for k, (_, items) in enumerate(bins, 1):
        d = out_root / f".stage{k}"
        d.mkdir(parents=True)
        (d / "manifest.txt").write_text("\n".join(manifest) + "\n")
        for name, p in items:
            (d / name).write_bytes(p)
        made.append(d)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("from_root", type=Path)
    ap.add_argument("out_root", type=Path, help="where the new .stageN/ go (its old ones are replaced); not FROM_ROOT")
    ap.add_argument("--max-mib", type=float, required=True)
    a = ap.parse_args()
    if a.from_root.resolve() == a.out_root.resolve():
        raise SystemExit("copy the chunks elsewhere first: the new ones replace .stageN/ in OUT_ROOT")
    for d in recut(a.from_root, a.out_root, a.max_mib):
        size = sum(f.stat().st_size for f in d.iterdir()) / MiB
        print(f"{d}: {size:.1f} MiB")


if __name__ == "__main__":
    main()
