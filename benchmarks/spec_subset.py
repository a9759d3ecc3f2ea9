"""Write a sweep spec with only some of its workloads (a device call that has time for part of a matrix).

    python3 benchmarks/spec_subset.py launchers/device/matrix_1gpu.yaml warmup,a-c64,d-c4 OUT.yaml

OUT.yaml should sit beside the spec: relative paths in it (trace files) resolve as before. Names that are not in
the spec are an error."""

from __future__ import annotations

import sys

import yaml


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    spec, names, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    with open(spec) as f:
        doc = yaml.safe_load(f)
    have = [w["name"] for w in doc["workloads"]]
    unknown = [n for n in names if n not in have]
    if unknown:
        sys.exit(f"spec_subset: workloads {unknown} are not in {spec} (it has {have})")
    doc["workloads"] = [w for w in doc["workloads"] if w["name"] in names]
    with open(out, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


if __name__ == "__main__":
    main()
