"""Re-cut the chunks that ``build_payload.sh`` / ``pack_chunks.py`` made into smaller ones, without rebuilding or
recompressing: each archive is reassembled from its parts (checked against the sha256 in ``manifest.txt``), then cut
and packed into new ``.stageN/`` folders by ``pack_chunks.py``'s own steps. What a device call may carry is 64 MB in
all, the working tree included, so when the tree grows the chunks must shrink (docs/vllm_compare.md).

    python benchmarks/vllm_stage/recut_chunks.py FROM_ROOT OUT_ROOT --max-mib 26    # FROM_ROOT holds .stage1/, ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_chunks import MiB, first_fit_decreasing, sha256, split, write_chunks  # noqa: E402


def reassemble(root: Path, work: Path) -> list[tuple[Path, str]]:
    """Every archive of the chunks under ``root`` as one file in ``work``, with its manifest line's tail."""
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
        archive = work / name
        with archive.open("wb") as whole:
            for part in found:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, whole)
        if sha256(archive) != digest:
            raise SystemExit(f"{name}: sha256 differs from the manifest's")
        out.append((archive, f"{digest} {mib}"))
    return out


def recut(root: Path, out_root: Path, max_mib: float) -> None:
    capacity = int(max_mib * MiB) - 64 * 1024  # room for manifest.txt, as pack_chunks.py leaves
    with tempfile.TemporaryDirectory() as tmp:
        manifest, items = [], []
        for archive, tail in reassemble(root, Path(tmp)):
            parts = split(archive, capacity) if archive.stat().st_size > capacity else [archive]
            manifest.append(f"{archive.name} {len(parts)} {tail}")
            items += parts
        write_chunks(first_fit_decreasing(items, capacity), manifest, out_root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("from_root", type=Path)
    ap.add_argument("out_root", type=Path, help="where the new .stageN/ go (its old ones are replaced); not FROM_ROOT")
    ap.add_argument("--max-mib", type=float, required=True)
    a = ap.parse_args()
    if a.from_root.resolve() == a.out_root.resolve():
        raise SystemExit("copy the chunks elsewhere first: the new ones replace .stageN/ in OUT_ROOT")
    recut(a.from_root, a.out_root, a.max_mib)


if __name__ == "__main__":
    main()
