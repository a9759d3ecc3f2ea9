"""benchmarks/compare_vllm.py on two real `vllm bench serve` results (vLLM 0.26.0, 4x H200, DP4+EP):
the default-mode run plays vLLM, the eager run plays the engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANCHOR = ROOT / "tests/data/vllm_anchor"
SCRIPT = ROOT / "benchmarks/compare_vllm.py"


def run_compare(folder: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def anchors(tmp_path: Path) -> Path:
    for f in ANCHOR.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_ratio_is_the_ratio_of_the_files_throughputs(anchors: Path):
    graph = json.loads((anchors / "dp4ep_agrs_graph_inf.json").read_text())
    eager = json.loads((anchors / "dp4ep_agrs_eager_inf.json").read_text())
    ratio = eager["output_throughput"] / graph["output_throughput"]
    itl_ratio = eager["p99_itl_ms"] / graph["p99_itl_ms"]

    out = run_compare(anchors, "--vllm", "graph", "--engine", "eager")

    row = next(line for line in out.splitlines() if line.startswith("| dp4ep_agrs |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "inf: 400 prompts, rate inf"
    assert float(cells[2].replace(",", "")) == pytest.approx(graph["output_throughput"], abs=0.05)
    assert float(cells[3].replace(",", "")) == pytest.approx(eager["output_throughput"], abs=0.05)
    assert cells[4] == f"{ratio:.2f} ❌"            # 0.22: below the 0.8 goal
    assert cells[7] == f"{itl_ratio:.2f} ❌"        # 4.19: above the 1.25 goal
    assert cells[-1] == "missed"


def test_metadata_labels_win_over_file_names(anchors: Path):
    """Runs saved by the retired vllm_vs_engine.sh carry bench_* metadata keys; the file name is then irrelevant."""
    for f, server in (("dp4ep_agrs_graph_inf.json", "vllm"), ("dp4ep_agrs_eager_inf.json", "engine")):
        doc = json.loads((anchors / f).read_text())
        doc.update(bench_server=server, bench_topology="dp4ep_agrs", bench_load="inf")
        (anchors / f"run-{server}.json").write_text(json.dumps(doc))
        (anchors / f).unlink()

    out = run_compare(anchors)

    assert "| vLLM out tok/s | engine out tok/s |" in out
    assert "| dp4ep_agrs | inf: 400 prompts, rate inf | 11,401.7 | 2,556.1 | 0.22 ❌ |" in out
