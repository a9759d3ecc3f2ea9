"""Pack a payload folder (``site/``, ``model/``) into chunks that each fit one device call's carry.

Every file of at least ``--big-mib`` gets its own ``.tar.xz``; the rest share ``rest.tar.xz``.
The archives are packed first-fit-decreasing into chunks of at most ``--max-mib``; an archive larger
than that is cut into parts (``NAME.part00``, ...) that travel in different chunks. Each chunk is a
folder ``OUT/.stageN/`` holding its archives (or parts) and ``manifest.txt``, the same in every chunk:

    <archive> <number of parts> <sha256 of the whole archive> <MiB>

``unpack.sh`` extracts an archive once all its parts have arrived, so chunks may come in any order.

    python pack_chunks.py PAYLOAD_DIR OUT_ROOT --max-mib 54
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 2**20


def compress(payload: Path, members: list[str], archive: Path) -> Path:
    """``tar`` the ``members`` (paths relative to ``payload``) and ``xz -9`` them into ``archive``."""
    listing = archive.with_suffix(".list")
    listing.write_text("\n".join(members) + "\n")
    with archive.open("wb") as out:
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(payload), "--no-recursion", "--verbatim-files-from",
                                "-T", str(listing)], stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", "-9", "-T1", "-c"], stdin=tar.stdout, stdout=out)
        tar.stdout.close()
        if tar.wait() != 0 or xz.returncode != 0:
            sys.exit(f"compressing {archive.name} failed (tar {tar.returncode}, xz {xz.returncode})")
    listing.unlink()
    return archive


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def split(archive: Path, part_bytes: int) -> list[Path]:
    """Cut ``archive`` into parts of at most ``part_bytes``; returns them in order."""
    parts = []
    with archive.open("rb") as f:
        while block := f.read(part_bytes):
            part = archive.with_name(f"{archive.name}.part{len(parts):02d}")
            part.write_bytes(block)
            parts.append(part)
    archive.unlink()
    return parts


def first_fit_decreasing(items: list[Path], capacity: int) -> list[list[Path]]:
    bins: list[list[Path]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda p: p.stat().st_size, reverse=True):
        size = item.stat().st_size
        for i, r in enumerate(room):
            if size <= r:
                bins[i].append(item)
                room[i] -= size
                break
        else:
            bins.append([item])
            room.append(capacity - size)
    return bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("payload", type=Path, help="folder holding site/ and model/")
    ap.add_argument("out_root", type=Path, help="where the .stageN/ folders go (the repository root)")
    ap.add_argument("--max-mib", type=float, required=True, help="largest chunk, MiB")
    ap.add_argument("--big-mib", type=float, default=8.0, help="files this large get an archive of their own")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    capacity = int(args.max_mib * MiB) - 64 * 1024  # room for manifest.txt and the folder
    files = sorted(str(p.relative_to(args.payload)) for p in args.payload.rglob("*") if p.is_file() or p.is_symlink())
    big = [f for f in files if (args.payload / f).stat().st_size >= args.big_mib * MiB]
    rest = [f for f in files if f not in set(big)]
    work = args.payload.parent / "archives"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    jobs = [(rest, work / "rest.tar.xz")] + [([f], work / (f.replace("/", "__") + ".tar.xz")) for f in big]
    with ThreadPoolExecutor(args.jobs) as pool:
        archives = list(pool.map(lambda job: compress(args.payload, *job), sorted(jobs, key=lambda j: -sum(
            (args.payload / m).stat().st_size for m in j[0]))))
    manifest, items = [], []
    for archive in sorted(archives):
        size, digest = archive.stat().st_size, sha256(archive)
        parts = split(archive, capacity) if size > capacity else [archive]
        manifest.append(f"{archive.name} {len(parts)} {digest} {size / MiB:.1f}")
        items += parts
    write_chunks(first_fit_decreasing(items, capacity), manifest, args.out_root)
    shutil.rmtree(work)


def write_chunks(bins: list[list[Path]], manifest: list[str], out_root: Path) -> None:
    """Replace ``out_root``'s ``.stageN/`` folders with one per bin: its archives (or parts), moved there, and the
    manifest."""
    for old in out_root.glob(".stage[0-9]*"):
        shutil.rmtree(old)
    for i, chunk in enumerate(bins, 1):
        folder = out_root / f".stage{i}"
        folder.mkdir(parents=True)
        (folder / "manifest.txt").write_text("\n".join(manifest) + "\n")
        for item in chunk:
            shutil.move(str(item), folder / item.name)
        total = sum(p.stat().st_size for p in folder.iterdir())
        print(f".stage{i}: {total / MiB:.1f} MiB ({', '.join(p.name for p in sorted(folder.iterdir()))})")


if __name__ == "__main__":
    main()
