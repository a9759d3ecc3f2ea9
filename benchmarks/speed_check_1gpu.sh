#!/usr/bin/env bash
# The engine-alone before/after check of a restructuring on one GPU (docs/benchmarks.md, "Issue 17"): the same spec,
# benchmarks/speed_check_1gpu.yaml, served from two source trees back to back on one machine.
# Usage (on the GPU machine, from the repository root): benchmarks/speed_check_1gpu.sh OUT TREE_NAME=TREE ...
#   e.g. benchmarks/speed_check_1gpu.sh $OUT before=.before after=.
# The engine's Python deps come from .whl/ (wheels built on the driver); torch and Triton are the machine's.
set -euo pipefail
out=$1; shift
pip install -q --no-index --no-deps --target /tmp/epkit-site .whl/*.whl
for pair in "$@"; do
  name=${pair%%=*}; tree=$(cd "${pair#*=}" && pwd)
  echo "== $name: $tree"
  PYTHONPATH=/tmp/epkit-site:$tree timeout -s INT -k 20 270 \
    python3 -m epkit.cli sweep benchmarks/speed_check_1gpu.yaml --results "$out/$name" --no-progress 2>&1 | tail -3
done
python3 - "$out" "$@" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for pair in sys.argv[2:]:
    name = pair.split("=")[0]
    for f in sorted((out / name).rglob("*.json")):
        d = json.loads(f.read_text())
        if "output_throughput" not in d:
            continue
        print(f"{name:7s} {f.stem:24s} out_tok/s={d['output_throughput']:8.1f} "
              f"ttft mean/p99={d.get('mean_ttft_ms', 0):8.1f}/{d.get('p99_ttft_ms', 0):8.1f} ms "
              f"itl mean/p99={d.get('mean_itl_ms', 0):6.2f}/{d.get('p99_itl_ms', 0):6.2f} ms "
              f"ok={d.get('completed')}")
PY
